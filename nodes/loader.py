"""Load Skip-DiT Model: one loader for every Skip-DiT-capable family.

Files come from ComfyUI's `diffusion_models` folders and from our own `skipdit` folder
(`models/skipdit/`, registered here; `extra_model_paths.yaml` may add more under the name `skipdit`), which
also lists the models bundled in `skipdit_core/assets/` (the demo model: nothing to download).
skipdit_core detects the family and config and loads DiT / Latte / Latte T2V strictly into our models
(`comfy_model`). Hunyuan-DiT (Tencent layout, diffusers layout mapped by skipdit_core, or a ComfyUI
all-in-one checkpoint) is delegated to ComfyUI's own Hunyuan-DiT model.
"""
from __future__ import annotations

import logging
import os

import comfy.sd
import folder_paths
from comfy_api.latest import io

from skipdit_core.loading import CheckpointError, inspect_checkpoint, read_state_dict, safetensors_header
from skipdit_core.models import hunyuan as core_hunyuan

from . import adapters
from .comfy_model import WEIGHT_DTYPES, model_patcher, pick_dtype

FOLDER = "skipdit"


def register_model_folder(bundled: str | os.PathLike = adapters.BUNDLED_MODELS_DIR) -> None:
    """models/skipdit/ (under ComfyUI's models directory, so --base-directory moves it too), then the
    models bundled with the pack (skipdit_core/assets/) as an extra path of the same folder: listed with
    the others, and a file of the same name in models/skipdit/ comes first."""
    path = os.path.join(folder_paths.models_dir, FOLDER)
    if FOLDER in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(FOLDER, path)
    else:
        folder_paths.folder_names_and_paths[FOLDER] = ([path], set(folder_paths.supported_pt_extensions))
    folder_paths.add_model_folder_path(FOLDER, str(bundled))


def checkpoint_names() -> list[str]:
    names = set(folder_paths.get_filename_list(FOLDER)) | set(folder_paths.get_filename_list("diffusion_models"))
    return sorted(names)


def checkpoint_path(name: str) -> str:
    return folder_paths.get_full_path(FOLDER, name) or folder_paths.get_full_path_or_raise("diffusion_models", name)


def _safetensors_keys(path: str):
    """The tensor names of a .safetensors file from its header alone, or None for other files."""
    header = safetensors_header(path)
    return None if header is None else [k for k in header if k != "__metadata__"]


def _core_hunyuan(sd: dict, path: str, weight_dtype: str, layout: str):
    """Hand a Tencent-layout Hunyuan-DiT state dict to ComfyUI's own model (after checking it fits)."""
    try:
        config = core_hunyuan.config_from_state_dict(sd)
    except (KeyError, ValueError, StopIteration) as e:
        raise ValueError(f"{path}: not a complete Hunyuan-DiT ({e})") from None
    problems = adapters.core_hunyuan_problems(config)
    if problems:
        raise ValueError(f"{path}: ComfyUI's Hunyuan-DiT cannot hold this model: " + "; ".join(problems))
    options = {} if WEIGHT_DTYPES[weight_dtype] is None else {"dtype": WEIGHT_DTYPES[weight_dtype]}
    patcher = comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options=options)
    if patcher is None:
        raise ValueError(f"{path}: ComfyUI did not recognise this Hunyuan-DiT state dict")
    info = f"hunyuan ({layout} layout) -> ComfyUI's Hunyuan-DiT: depth {config.depth}, width {config.hidden_size}"
    return patcher, info


def load(path: str, weight_dtype: str = "default"):
    """(MODEL, one-line description) of a checkpoint file; ValueError with the reason otherwise.

    The MODEL carries `cached_patcher_init`, how to load it again: ComfyUI 0.38's MultiGPU nodes
    (`ModelPatcher.deepclone_multigpu`) build each device's own copy of the weights with it, as they
    do for core's file loaders (`comfy/sd.py`); without it MultiGPU CFG Split refuses the model."""
    patcher, info = _load(path, weight_dtype)
    patcher.cached_patcher_init = (reload_patcher, (path, weight_dtype))
    return patcher, info


def reload_patcher(path: str, weight_dtype: str = "default", disable_dynamic: bool = False):
    """A new, independent MODEL of the same file (the factory of `cached_patcher_init`; 0.38 passes
    disable_dynamic for its CPU copies, which our patchers need no special handling for)."""
    return load(path, weight_dtype)[0]


def _load(path: str, weight_dtype: str):
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype must be one of {list(WEIGHT_DTYPES)}, got {weight_dtype!r}")
    keys = _safetensors_keys(path)
    if keys is not None and adapters.is_comfy_all_in_one(keys):
        sd, _, _ = read_state_dict(path)
        return _load_all_in_one(sd, path, weight_dtype)
    try:
        ckpt = inspect_checkpoint(path)
    except CheckpointError as e:
        if keys is None and os.path.isfile(path):  # a pickle: perhaps an all-in-one .ckpt
            try:
                sd, _, _ = read_state_dict(path)
            except CheckpointError:
                sd = {}
            if adapters.is_comfy_all_in_one(sd):
                return _load_all_in_one(sd, path, weight_dtype)
        raise ValueError(str(e)) from None
    if ckpt.family == "hunyuan":
        return _core_hunyuan(ckpt.state_dict, path, weight_dtype, ckpt.layout)
    if ckpt.family == "wan":  # ComfyUI's own Wan runs it, with its own latent format and sampling settings
        raise ValueError(
            f"{path}: a Wan model ({ckpt.layout} layout): load it with ComfyUI's Load Diffusion Model "
            "(models/diffusion_models/); Apply Skip-Cache works on that MODEL"
        )
    dtype = pick_dtype(weight_dtype, ckpt.state_dict)
    d = ckpt.describe()
    info = (
        f"{d['family']} ({d['description']}), {d['variant']} with {d['long_skips']} long skips, "
        f"{d['parameters']:,} parameters, {adapters.latent_space(ckpt.config.in_channels)} space, weights {dtype}"
    )
    return model_patcher(ckpt, dtype), info


def _load_all_in_one(sd: dict, path: str, weight_dtype: str):
    unet = adapters.strip_prefix(sd)
    if "mlp_t5.0.weight" not in unet:
        raise ValueError(
            f"{path}: an all-in-one checkpoint of a model that is not Hunyuan-DiT; load it with ComfyUI's Load Checkpoint"
        )
    return _core_hunyuan(unet, path, weight_dtype, "ComfyUI all-in-one")


class LoadSkipDiTModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SkipDiTModelLoader",
            display_name="Load Skip-DiT Model",
            category="Skip-DiT",
            description=(
                "Loads a DiT, Latte, Latte T2V or Hunyuan-DiT checkpoint (Skip-DiT or vanilla) from models/skipdit or "
                "models/diffusion_models, or a model bundled with the pack; family and config are detected from the "
                "weights. Returns a native MODEL for the stock samplers (pixel-space models: the denoised prediction "
                "clamped to [-1, 1]). Hunyuan-DiT becomes ComfyUI's own Hunyuan-DiT model."
            ),
            inputs=[
                io.Combo.Input("checkpoint", options=checkpoint_names(), tooltip="A file in models/skipdit or models/diffusion_models, or a model bundled with the pack (skip-latte-shapes.safetensors: the demo)."),
                io.Combo.Input(
                    "weight_dtype", options=list(WEIGHT_DTYPES), default="default",
                    tooltip="default: ComfyUI's choice for the device (float32 on the CPU).",
                ),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def validate_inputs(cls, checkpoint):
        # ComfyUI (0.3.64) checks the value of a V3 combo only through this: without it a missing file
        # is found only when the node runs, after the nodes before it. Here the queued prompt is refused
        # at once, naming the file and where it was looked for. (ComfyUI reports a failure once per
        # argument of this method: hence the checkpoint alone; execute checks weight_dtype.)
        if checkpoint is not None and checkpoint not in checkpoint_names():
            return (
                f"{checkpoint!r} is not in models/{FOLDER}, models/diffusion_models or the models bundled with the pack "
                "(download it there, or pick another file)"
            )
        return True

    @classmethod
    def execute(cls, checkpoint, weight_dtype) -> io.NodeOutput:
        path = checkpoint_path(checkpoint)
        model, info = load(path, weight_dtype)
        logging.info(f"Load Skip-DiT Model: {checkpoint}: {info}")
        return io.NodeOutput(model)


register_model_folder()
