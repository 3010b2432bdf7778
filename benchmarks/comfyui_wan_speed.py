"""Apply Skip-Cache on ComfyUI's own Wan at the Wan 2.1 T2V 1.3B shape (random weights), inside a real ComfyUI:
the measured speedup of each setting against its bound.

    COMFYUI_PATH=/path/to/ComfyUI OMP_NUM_THREADS=1 /path/to/comfy-venv/bin/python benchmarks/comfyui_wan_speed.py

In-process in ComfyUI's Python: a Wan of the 1.3B shape (30 blocks, width 1536, ffn 8960, 16 latent channels;
random weights, fp32) is loaded through `comfy.sd.load_diffusion_model_state_dict` (what core Load Diffusion Model
does with a file) and sampled by the stock KSampler (euler / simple, shift 8 as ComfyUI's Wan 2.1 T2V config, cfg
6: cond and uncond in one batch). The latent is reduced for a CPU (the default 1 x 16 x 1 x 8 x 8: 16 tokens; 480p
with 33 frames is 32,760) and so are the text states (64 tokens of random umT5-width states): per block the cost
keeps its shape, while the parts outside the blocks (text embedding, patch embedding, head) weigh more than at
full size, so the measured speedups here are below what the full size gives.

Per setting: wall seconds of the whole sampling run against an uncached run right before it (the fastest of
`--repeats` alternating pairs), the cached / full steps and the bound 1 / ((1 - f) + f 2k / L), and the speedup
Apply Skip-Cache's own log line measured (median model call times).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from comfyui_inprocess import RECORDS, run_sampler, setup, skip_cache  # noqa: E402
from comfyui_server import PACK_NAME, make_base_dir  # noqa: E402

# (label, interval, start, end, forecast, damping)
SETTINGS = [
    ("n=2 700->50 (auto: the paper's text-to-video window)", 2, 700.0, 50.0, 0, 1.0),
    ("n=2 1000->0", 2, 1000.0, 0.0, 0, 1.0),
    ("n=3 1000->0 forecast 1 damping 0.7", 3, 1000.0, 0.0, 1, 0.7),
    ("n=4 1000->0 forecast 1 damping 0.7", 4, 1000.0, 0.0, 1, 0.7),
]
LOG = re.compile(r"(\d+) full \+ (\d+) cached of (\d+) steps.*measured speedup ([\d.]+)x \(bound ([\d.]+)x\)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--frames", type=int, default=1, help="latent frames")
    p.add_argument("--size", type=int, default=8, help="latent height and width")
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    comfy_path = os.environ.get("COMFYUI_PATH")
    if not comfy_path:
        raise SystemExit("set COMFYUI_PATH to a ComfyUI checkout (and run this with its Python)")
    base = make_base_dir(Path(tempfile.mkdtemp(prefix="skipdit-wan-speed-")))
    nodes = setup(comfy_path, str(base))
    import asyncio
    import logging

    import torch

    import comfy.sd
    from helpers import randomize
    from skipdit_core import models

    logging.getLogger().addHandler(RECORDS)
    logging.getLogger().setLevel(logging.INFO)
    asyncio.run(nodes.load_custom_node(str(base / "custom_nodes" / PACK_NAME)))
    apply = nodes.NODE_CLASS_MAPPINGS["SkipDiTApplySkipCache"]

    torch.manual_seed(0)
    ours = randomize(models.build_model("wan", models.make_config("wan", {}, preset="1.3B")), seed=1)
    state = {k: v.contiguous() for k, v in ours.state_dict().items()}
    del ours
    model = comfy.sd.load_diffusion_model_state_dict(state, model_options={"dtype": torch.float32})
    del state
    dm = model.model.diffusion_model
    from comfyui_version import __version__

    print(f"ComfyUI {__version__} ({comfy_path}): {type(dm).__module__}.{type(dm).__name__}, {len(dm.blocks)} blocks, width {dm.dim}, "
          f"{sum(p.numel() for p in dm.parameters()) / 1e9:.2f} B parameters; latent 1 x 16 x {args.frames} x "
          f"{args.size} x {args.size}, text {args.text_tokens} tokens, euler / simple {args.steps} steps, cfg 6, "
          f"torch threads {torch.get_num_threads()}")
    g = torch.Generator().manual_seed(3)
    positive = [[torch.randn(1, args.text_tokens, 4096, generator=g) * 0.3, {}]]
    negative = [[torch.zeros(1, args.text_tokens, 4096), {}]]
    latent = {"samples": torch.zeros(1, 16, args.frames, args.size, args.size)}

    def timed(m) -> float:
        start = time.perf_counter()
        run_sampler(nodes, m, positive, negative, latent, args.steps, 6.0, "euler", 1, "simple")
        return time.perf_counter() - start

    run_sampler(nodes, model, positive, negative, latent, 2, 6.0, "euler", 1, "simple")  # warm-up
    print("| setting | full / cached | wall speedup | log's measured speedup | bound |")
    print("|---|---|---:|---:|---:|")
    for label, n, start, end, forecast, damping in SETTINGS:
        patched = skip_cache(apply, model, n, start, end, 1, forecast, damping)
        best_plain, best_cached, line = float("inf"), float("inf"), None
        for _ in range(args.repeats):
            best_plain = min(best_plain, timed(model))
            mark = len(RECORDS.messages)
            best_cached = min(best_cached, timed(patched))
            line = next(m for m in RECORDS.messages[mark:] if m.startswith("Skip-Cache ["))
        full, cached, steps, measured, bound = LOG.search(line).groups()
        print(f"| {label} | {full} / {cached} | {best_plain / best_cached:.2f}x | {measured}x | {bound}x |", flush=True)


if __name__ == "__main__":
    main()
