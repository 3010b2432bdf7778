"""ComfyUI core's Wan on a saved Wan file, for tests/test_wan.py (run with ComfyUI's Python, not imported by pytest):

    python tests/comfyui_wan.py COMFYUI_PATH MODEL.safetensors INPUTS.safetensors OUT.safetensors

ComfyUI is imported in-process as tests/comfyui_inprocess.py does (its folder on sys.path, `--cpu`); the model's
config comes from ComfyUI's own `model_detection.detect_unet_config` (what Load Diffusion Model does with a file in
models/diffusion_models/), the model is `comfy.ldm.wan.model.WanModel` with the file's weights loaded strictly.
INPUTS holds x (N, C, F, H, W), context (N, L, text_dim) and any number of timestep tensors `t_<name>`; OUT gets
`out_<name>` for each, in float32, and `config` is printed as one JSON line.
"""
from __future__ import annotations

import json
import os
import sys


def main(comfy_path: str, model_path: str, inputs_path: str, out_path: str) -> None:
    sys.path.insert(0, comfy_path)
    os.chdir(comfy_path)
    from comfy.cli_args import args

    args.cpu = True
    import torch
    from safetensors.torch import load_file, save_file

    import comfy.ldm.wan.model
    import comfy.model_detection
    import comfy.ops

    sd = load_file(model_path)
    config = comfy.model_detection.detect_unet_config(sd, "")
    model = comfy.ldm.wan.model.WanModel(**config, operations=comfy.ops.disable_weight_init, device="cpu",
                                         dtype=torch.float32)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise SystemExit(f"ComfyUI's WanModel does not take the file: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.eval()
    inputs = load_file(inputs_path)
    out = {}
    with torch.no_grad():
        for key, t in inputs.items():
            if key.startswith("t_"):
                out["out_" + key[2:]] = model(inputs["x"], t, inputs["context"], transformer_options={}).float().contiguous()
    save_file(out, out_path)
    print(json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}))


if __name__ == "__main__":
    main(*sys.argv[1:5])
