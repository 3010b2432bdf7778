"""ComfyUI-free logic of the node pack: what the nodes translate between ComfyUI's conventions and
`skipdit_core`'s. No ComfyUI import here (CI tests this module without ComfyUI); no model math either,
only layouts, channels, labels, settings and names.

ComfyUI's conventions (comfy/model_base.py, comfy/latent_formats.py):
- latents are [B, C, H, W] for images and [B, C, T, H, W] for video (latent_dimensions 3);
- the diffusion model is called with the timestep 0..999 and returns the prediction with as many
  channels as the latent (no learned variance);
- conditioning is a list of [tensor, dict]; the dict's keys reach `BaseModel.extra_conds`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

import torch

import skipdit_core
from skipdit_core.models import UStack
from skipdit_core.skip_cache import AUTHORS_SETTINGS, SkipCacheConfig

FAMILY_LABELS = {"dit": "DiT", "latte": "Latte", "latte_t2v": "Latte T2V", "hunyuan": "Hunyuan-DiT", "wan": "Wan"}
OWN_FAMILIES = ("dit", "latte", "latte_t2v")  # run by our adapter; Hunyuan-DiT is delegated to ComfyUI's model

# The DDPM linear schedule (1e-4 -> 0.02, 1000 steps) of DiT, Latte and Latte T2V. ComfyUI's "linear"
# is the scaled-linear schedule (sqrt of the ends, interpolated, squared); the plain linspace is "sqrt_linear".
DDPM_LINEAR = {"beta_schedule": "sqrt_linear", "linear_start": 1e-4, "linear_end": 0.02}
PREDICTION = {"dit": "eps", "latte": "eps", "latte_t2v": "eps", "hunyuan": "v"}


def sampling_settings(family: str) -> dict:
    """`sampling_settings` of ComfyUI's model config for one of our families."""
    if family not in OWN_FAMILIES:
        raise ValueError(f"no own sampling settings for {family!r}: Hunyuan-DiT runs as ComfyUI's own model")
    return dict(DDPM_LINEAR)


def is_video(family: str) -> bool:
    return family in ("latte", "latte_t2v")


def latent_space(in_channels: int) -> str:
    """'pixels' for a model trained on RGB (3 channels, no VAE), else 'sd_vae' (4-channel SD VAE latents)."""
    return "pixels" if in_channels == 3 else "sd_vae"


# ----------------------------------------------------------------------------- pixel space

# The values pixel-space models denoise (RGB scaled to [-1, 1], as skipdit_core's training data and
# media writers use); the pack's pixel latent formats are the identity on them, and Decode Video Latent
# maps this range to IMAGE's [0, 1].
PIXEL_RANGE = (-1.0, 1.0)


def clamp_pixels(x0: torch.Tensor) -> torch.Tensor:
    """An x0 (denoised) prediction of a pixel-space model clamped to PIXEL_RANGE."""
    return x0.clamp(*PIXEL_RANGE)


def clamp_denoised(args: dict) -> torch.Tensor:
    """ComfyUI `sampler_post_cfg_function` of pixel-space models: the guided x0 prediction, clamped.

    Why: an epsilon model's x0 = (x - sqrt(1 - a) eps) / sqrt(a) amplifies the eps error by ~60x at
    t ~ 900 (a ~ 3e-4); in pixel space that early x0 lands far outside the data range and sampling ends
    in noise. skipdit_core's sampler clamps it (`clip_denoised`, on for pixel-space models, as
    improved-diffusion does) and re-derives eps from the clamped x0; ComfyUI's samplers step from the
    denoised x0 (Euler: x' = x0 + sigma' (x - x0) / sigma), so clamping it is the same operation. It runs
    after classifier-free guidance, like the pipeline's clamp of the guided prediction: clamping cond and
    uncond separately before guidance would give another result. Latent models are never clamped (SD VAE
    latents are not bounded to [-1, 1])."""
    return clamp_pixels(args["denoised"])


# ----------------------------------------------------------------------------- layouts and channels


def to_model_layout(family: str, x: torch.Tensor) -> torch.Tensor:
    """ComfyUI's latent -> the layout our model takes. Video in ComfyUI is [B, C, T, H, W]; Latte
    (class / unconditional) wants (B, F, C, H, W); Latte T2V and DiT take ComfyUI's layout as it is."""
    if family == "latte":
        if x.ndim != 5:
            raise ValueError(f"Latte needs a video latent [B, C, T, H, W], got shape {tuple(x.shape)}: use Empty Latte Latent")
        return x.transpose(1, 2)
    if family == "latte_t2v" and x.ndim != 5:
        raise ValueError(f"Latte T2V needs a video latent [B, C, T, H, W], got shape {tuple(x.shape)}: use Empty Latte Latent")
    if family == "dit" and x.ndim != 4:
        raise ValueError(f"DiT is an image model: it needs a latent [B, C, H, W], got shape {tuple(x.shape)}")
    return x


def pad_to_patch(x: torch.Tensor, patch: int) -> torch.Tensor:
    """A latent [..., H, W] padded on the bottom / right to multiples of the patch size, circularly, as
    core ComfyUI models do (`comfy.ldm.common_dit.pad_to_patch_size`): any latent size samples, and the
    caller crops the output back to H x W."""
    ph, pw = (-x.shape[-2]) % patch, (-x.shape[-1]) % patch
    if not ph and not pw:
        return x
    return torch.nn.functional.pad(x, (0, pw, 0, ph) + ((0, 0) if x.ndim == 5 else ()), mode="circular")


def to_comfy_output(family: str, out: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Our model's output -> ComfyUI's layout, without the learned-variance channels.

    DiT / Latte / Latte T2V with learn_sigma predict [eps, variance] along the channel axis; ComfyUI's
    samplers use the epsilon only, so the second half is dropped (diffusion.CFG_CONVENTIONS keeps it only
    for the reference DDPM sampler's variance)."""
    if family == "latte":
        out = out.transpose(1, 2)
    if out.shape[1] == 2 * in_channels:
        out = out[:, :in_channels]
    elif out.shape[1] != in_channels:
        raise ValueError(f"the model predicted {out.shape[1]} channels for {in_channels} input channels")
    return out


# ----------------------------------------------------------------------------- class labels

LABEL_KEY = "skipdit_class_label"  # the key of our class-label conditioning (reaches extra_conds)
NULL_LABEL = -1  # stands for the model's null label (num_classes), CFG's unconditional half


def resolve_labels(labels, num_classes: int, batch: Optional[int] = None) -> torch.Tensor:
    """Class labels of the conditioning -> the model's labels: NULL_LABEL becomes `num_classes` (the
    null class of DiT / Latte's label embedder). Errors name the valid range."""
    y = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if num_classes <= 0:
        raise ValueError("this model is unconditional: it takes no class label")
    bad = [int(v) for v in y if not (v == NULL_LABEL or 0 <= v < num_classes)]
    if bad:
        raise ValueError(f"class label {bad[0]} is out of range: this model has classes 0..{num_classes - 1}")
    y = torch.where(y == NULL_LABEL, torch.full_like(y, num_classes), y)
    if batch is not None and y.numel() == 1:
        y = y.expand(batch)
    return y


# ----------------------------------------------------------------------------- text


def truncate_tokens(tokens: dict, max_tokens: int) -> dict:
    """Cut every tokenised sequence of a ComfyUI token dict ({encoder: [[(id, weight, ...), ...]]}) to
    `max_tokens`, keeping its last token (T5's end-of-sequence), as `truncation=True, max_length=N` of
    the Hugging Face tokenizer does. Latte T2V was trained with 120 T5 tokens."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    out = {}
    for key, chunks in tokens.items():
        if not isinstance(chunks, list):
            out[key] = chunks
            continue
        out[key] = [c if len(c) <= max_tokens else list(c[: max_tokens - 1]) + [c[-1]] for c in chunks]
    return out


# ----------------------------------------------------------------------------- checkpoints

COMFY_UNET_PREFIX = "model.diffusion_model."
# The small models shipped inside skipdit_core (the demo's pixel-space Skip-Latte and its vanilla twin,
# skipdit_core.demo.DEMO_MODEL / VANILLA_TWIN): the loader lists them beside models/skipdit, so the demo
# workflow runs with nothing downloaded.
BUNDLED_MODELS_DIR = Path(skipdit_core.__file__).resolve().parent / "assets"


def is_comfy_all_in_one(keys: Iterable[str]) -> bool:
    """A ComfyUI / SD-style all-in-one checkpoint (the diffusion model under `model.diffusion_model.`,
    text encoders and VAE beside it)."""
    return any(k.startswith(COMFY_UNET_PREFIX) for k in keys)


def strip_prefix(sd: dict, prefix: str = COMFY_UNET_PREFIX) -> dict:
    """The entries under `prefix`, without it."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


# What ComfyUI's HunYuanDiT (comfy/ldm/hydit/models.py) builds: comfy/model_detection.py reads only the
# depth, the width, the DiT-g/2 mlp ratio and v1.0/1.1's size/style conditioning from the keys; the rest
# are the class defaults.
CORE_HUNYUAN_FIXED = dict(
    patch_size=2, in_channels=4, text_states_dim=1024, text_states_dim_t5=2048, text_len=77,
    text_len_t5=256, pooled_dim=1024, pooler_heads=8, learn_sigma=True,
)


def core_hunyuan_problems(config) -> list[str]:
    """Why ComfyUI's own Hunyuan-DiT cannot hold a checkpoint of this `HunyuanDiTConfig` (empty: it can)."""
    problems = []
    for name, want in CORE_HUNYUAN_FIXED.items():
        have = getattr(config, name)
        if have != want:
            problems.append(f"{name}={have} (ComfyUI's Hunyuan-DiT has {want})")
    if config.hidden_size % 16:
        problems.append(f"hidden_size={config.hidden_size} is not a multiple of ComfyUI's 16 heads")
    elif config.num_heads != 16:
        problems.append(f"num_heads={config.num_heads} (ComfyUI's Hunyuan-DiT has 16)")
    elif (config.hidden_size // 16) % 8 or config.hidden_size // 16 > 128:
        problems.append(f"head size {config.hidden_size // 16} (ComfyUI's attention needs a multiple of 8, at most 128)")
    g2 = config.hidden_size == 1408 and config.depth == 40
    want_mlp = 4.3637 if g2 else 4.0
    if int(config.hidden_size * config.mlp_ratio) != int(config.hidden_size * want_mlp):
        problems.append(f"mlp_ratio={config.mlp_ratio:g} (ComfyUI's Hunyuan-DiT has {want_mlp:g} at this size)")
    if config.use_style_cond_and_image_meta_size and config.hidden_size != 1408:
        problems.append(
            "v1.0/1.1 size and style conditioning at a width other than 1408 (ComfyUI detects v1.0/1.1 by the "
            "DiT-g/2 width of extra_embedder)"
        )
    if config.depth % 2:
        problems.append(f"depth={config.depth} is odd (its long skips pair an even number of blocks)")
    return problems


def core_wan_stack(num_blocks: int) -> UStack:
    """The stack of ComfyUI's WanModel: its blocks in a row, no long skips."""
    return UStack(num_blocks, 0)


def core_hunyuan_stack(depth: int) -> UStack:
    """The U-stack of ComfyUI's HunYuanDiT: blocks < depth/2 - 1 push their output, block i > depth/2
    pops (LIFO), so block i receives block depth-1-i: S = depth/2 - 1 long skips, blocks depth/2 - 1 and
    depth/2 in the middle."""
    if depth % 2 or depth < 4:
        raise ValueError(f"a Hunyuan-DiT needs an even depth >= 4, got {depth}")
    return UStack(depth, depth // 2 - 1)


# ----------------------------------------------------------------------------- Skip-Cache settings

WINDOW_UNITS = ("timesteps", "percent")


def cache_config(
    family: str, interval: int, settings: str, unit: str, start: float, end: float, depth: int,
    max_depth: Optional[int] = None, forecast: int = 0, forecast_damping: float = 1.0, empty_steps: int = 0,
    forecast_warmup: bool = False, reuse: str = "state",
) -> SkipCacheConfig:
    """The SkipCacheConfig of the Apply Skip-Cache node's inputs.

    settings "auto": the authors' window and depth for the family (n from the input), the depth capped at
    the model's `max_depth` (long skips, and 2k < units: DiT's k=4 is for DiT-XL's 28 blocks); "custom": start / end in training
    timesteps 0..1000 (unit "timesteps") or in percent of sampling progress 0..100 (unit "percent",
    0 % = t 1000), and the depth k. forecast (0, 1, 2), forecast_damping, empty_steps, forecast_warmup and
    reuse ("state" or "residual", `skip_cache.REUSE_KINDS`) apply to both."""
    options = dict(forecast=int(forecast), forecast_damping=float(forecast_damping), empty_steps=int(empty_steps),
                   forecast_warmup=bool(forecast_warmup), reuse=reuse)
    if settings == "auto":
        base = AUTHORS_SETTINGS[family]
        k = base.depth if not max_depth else min(base.depth, max_depth)
        return SkipCacheConfig(interval=int(interval), start=base.start, end=base.end, depth=k, **options)
    if settings != "custom":
        raise ValueError(f"settings must be 'auto' or 'custom', got {settings!r}")
    if unit == "percent":
        for name, value in (("start", start), ("end", end)):
            if not 0 <= value <= 100:
                raise ValueError(f"Skip-Cache {name} in percent must be in 0..100, got {value}")
        if start >= end:
            raise ValueError(
                f"Skip-Cache window: start {start:g}% must come before its end {end:g}% (percent of sampling "
                "progress: 0% is the first step, 100% the last)"
            )
        return SkipCacheConfig.from_percent(start / 100.0, end / 100.0, int(interval), int(depth), **options)
    if unit != "timesteps":
        raise ValueError(f"window unit must be one of {WINDOW_UNITS}, got {unit!r}")
    return SkipCacheConfig(interval=int(interval), start=float(start), end=float(end), depth=int(depth), **options)


# ----------------------------------------------------------------------------- frames


def video_latent_to_frames(x: torch.Tensor) -> torch.Tensor:
    """[B, C, T, H, W] -> [(B T), C, H, W], the frames of each video in order; images pass through."""
    if x.ndim == 5:
        return x.transpose(1, 2).flatten(0, 1)
    if x.ndim == 4:
        return x
    raise ValueError(f"expected a latent [B, C, H, W] or [B, C, T, H, W], got shape {tuple(x.shape)}")


def pixels_to_images(frames: torch.Tensor) -> torch.Tensor:
    """Pixel-space model output [N, 3, H, W] in PIXEL_RANGE ([-1, 1]) -> ComfyUI IMAGE [N, H, W, 3] in [0, 1]."""
    if frames.shape[1] != 3:
        raise ValueError(
            f"these latents have {frames.shape[1]} channels, not 3 RGB pixels: connect the VAE they were made for"
        )
    lo, hi = PIXEL_RANGE
    return ((frames.float() - lo) / (hi - lo)).clamp(0.0, 1.0).movedim(1, -1).contiguous()
