"""Generation: a loaded model + its family's sampler + guidance + (optionally) Skip-Cache.

`generate()` runs one sampling trajectory and returns the final sample with its timing and cache
statistics. Conditioning per family:

| family    | sample layout     | conditional inputs                         | unconditional half            |
|-----------|-------------------|--------------------------------------------|-------------------------------|
| dit       | (B, C, H, W)      | class label                                | the null label (num_classes)  |
| latte     | (B, F, C, H, W)   | class label (UCF101) or none (FFS/Sky/...) | the null label                |
| latte_t2v | (B, C, F, H, W)   | T5 states `prompt_embeds` (1, L, 4096)     | `negative_prompt_embeds`      |
| hunyuan   | (B, C, H, W)      | `prompt_embeds` (CLIP), `prompt_embeds_2` (T5), masks | `negative_*` of the same |
| wan       | (B, C, F, H, W)   | umT5 states `prompt_embeds` (1, L, 4096)   | `negative_prompt_embeds`      |

Wan's states are zeroed where a `prompt_attention_mask` says padding (Wan trims them to the prompt's tokens and
pads with zeros; ComfyUI zeroes the masked ones) and zero-padded to the model's text_len (512) by the model.

Text conditioning comes as a `.safetensors` file with diffusers' pipeline names (`prompt_embeds`,
`prompt_attention_mask`, `prompt_embeds_2`, `prompt_attention_mask_2`, and `negative_` versions).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from .diffusion import CFG_CONVENTIONS, guided, make_sampler
from .skip_cache import SkipCacheConfig, SkipCacheRun, SkipCacheStats


@dataclass
class Request:
    """What to generate. size: latent height = width; frames: video models only."""

    family: str
    label: Optional[int | Sequence[int]] = None  # one label, or one per sample of the batch
    text: dict = field(default_factory=dict)  # tensors of a text-embedding file
    frames: int = 16
    size: int = 32
    batch: int = 1
    sampler: Optional[str] = None  # None: the family's (DDPM; Euler for Wan's flow matching)
    steps: Optional[int] = None
    guidance: Optional[float] = None
    seed: int = 0
    clip_denoised: Optional[bool] = None  # clamp the x0 prediction to [-1, 1]; None: for pixel-space models
    shift: Optional[float] = None  # Wan's flow shift (None: 5, Wan's own); other families take none


def is_pixel_space(model) -> bool:
    """A model that denoises RGB (or grey) pixels, not VAE latents."""
    return model.config.in_channels in (1, 3)


@dataclass
class Result:
    sample: torch.Tensor  # the final latents / pixels, in the family's layout, float32
    seconds: float
    stats: Optional[SkipCacheStats]
    speedup_bound: float = 1.0


def sample_shape(model, req: Request) -> tuple:
    c = model.config
    if req.family == "latte":
        return (req.batch, req.frames, c.in_channels, req.size, req.size)
    if req.family in ("latte_t2v", "wan"):
        return (req.batch, c.in_channels, req.frames, req.size, req.size)
    return (req.batch, c.in_channels, req.size, req.size)


def _text(req: Request, key: str, negative: bool, like: Optional[torch.Tensor] = None) -> torch.Tensor:
    name = f"negative_{key}" if negative else key
    if name in req.text:
        return req.text[name]
    if negative and like is not None:  # no negative prompt given: zeros stand for the empty text
        return torch.zeros_like(like) if "mask" not in key else torch.ones_like(like)
    raise ValueError(f"the text-embedding file has no {name!r} (keys: {', '.join(sorted(req.text)) or 'none'})")


def conditioning(model, req: Request, unconditional: bool) -> dict:
    """Model keyword inputs of one half (B = req.batch rows), on no particular device yet."""
    c, b = model.config, req.batch
    if req.family in ("dit", "latte"):
        if req.family == "latte" and c.num_classes == 0:
            return {}
        if req.label is None:
            raise ValueError(f"this {req.family} model is class-conditional: give a class label in 0..{c.num_classes - 1}")
        labels = torch.as_tensor(req.label, dtype=torch.long).reshape(-1)
        if labels.numel() not in (1, b):
            raise ValueError(f"{labels.numel()} class labels for a batch of {b}: give one, or one per sample")
        for label in labels.tolist():
            if not 0 <= label < c.num_classes:
                raise ValueError(f"class label {label} is out of range: this model has classes 0..{c.num_classes - 1}")
        y = torch.full((b,), c.num_classes, dtype=torch.long) if unconditional else labels.expand(b).clone()
        return {"y": y}
    rep = lambda t: t.expand(b, *t.shape[1:]) if t.shape[0] == 1 else t  # noqa: E731
    if req.family == "latte_t2v":
        states = _text(req, "prompt_embeds", False)
        mask = req.text.get("prompt_attention_mask", torch.ones(states.shape[:2], dtype=torch.long))
        if unconditional:
            states, mask = _text(req, "prompt_embeds", True, states), _text(req, "prompt_attention_mask", True, mask)
        return {"encoder_hidden_states": rep(states), "encoder_attention_mask": rep(mask)}
    if req.family == "wan":
        states = _text(req, "prompt_embeds", False)
        mask = req.text.get("prompt_attention_mask")
        if unconditional:
            states = _text(req, "prompt_embeds", True, states)
            mask = req.text.get("negative_prompt_attention_mask")
        if mask is not None:  # padding tokens are zero states for Wan (trimmed, then zero-padded)
            states = states * mask[..., None].to(states.dtype)
        return {"encoder_hidden_states": rep(states)}
    clip, t5 = _text(req, "prompt_embeds", False), _text(req, "prompt_embeds_2", False)
    clip_mask = req.text.get("prompt_attention_mask", torch.ones(clip.shape[:2], dtype=torch.long))
    t5_mask = req.text.get("prompt_attention_mask_2", torch.ones(t5.shape[:2], dtype=torch.long))
    if unconditional:
        clip, clip_mask = _text(req, "prompt_embeds", True, clip), _text(req, "prompt_attention_mask", True, clip_mask)
        t5, t5_mask = _text(req, "prompt_embeds_2", True, t5), _text(req, "prompt_attention_mask_2", True, t5_mask)
    px = float(req.size * 8)
    return {
        "encoder_hidden_states": rep(clip), "text_embedding_mask": rep(clip_mask),
        "encoder_hidden_states_t5": rep(t5), "text_embedding_mask_t5": rep(t5_mask),
        "image_meta_size": torch.tensor([[px, px, px, px, 0.0, 0.0]]).expand(b, 6),
        "style": torch.zeros(b, dtype=torch.long),
    }


def _to(inputs: dict, device, dtype) -> dict:
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}


def generate(
    model,
    req: Request,
    cache: Optional[SkipCacheConfig] = None,
    progress: Optional[Callable[[int, int, int], None]] = None,
    cfg_parallel=None,
) -> Result:
    """Sample once; with `cache`, through a fresh Skip-Cache run (state never shared between calls).
    `cfg_parallel` (a `skipdit_core.parallel.CFGParallel`): this process evaluates one half of every
    guided model call and the halves are exchanged, so each process caches only its half's deep state."""
    device, dtype = next(model.parameters()).device, model.dtype
    # Pixels live in [-1, 1]: clamping x0 keeps the early steps (where x0 = (x - sqrt(1-a) eps) / sqrt(a)
    # amplifies the eps error ~60x) on the data range, as improved-diffusion does for pixel models.
    clip = req.clip_denoised if req.clip_denoised is not None else is_pixel_space(model)
    sampler = make_sampler(req.family, req.sampler, req.steps, clip_denoised=clip,
                           prediction=getattr(model.config, "prediction", None), shift=req.shift)
    cond = _to(conditioning(model, req, unconditional=False), device, dtype)
    use_cfg = req.guidance is not None and req.guidance > 1 and bool(cond)
    if use_cfg:
        uncond = _to(conditioning(model, req, unconditional=True), device, dtype)
        first, second = (cond, uncond) if CFG_CONVENTIONS[req.family].cond_first else (uncond, cond)
        inputs = {k: torch.cat([first[k], second[k]]) for k in cond}
    else:
        inputs = cond
    run = SkipCacheRun.for_model(cache, model) if cache is not None else None
    split = cfg_parallel if use_cfg else None  # without guidance there is no second half to hand over
    if split is not None:
        inputs = {k: split.half(v) for k, v in inputs.items()}

    def denoise_batch(x, t):
        cut = run.begin_step(t) if run else None
        if split is not None:
            x, t = split.half(x), split.half(t)
        out = model(x.to(dtype), t, **inputs, cut=cut)
        if run:
            run.end_step(cut)
        return out.float() if split is None else split.join(out.float())

    generator = torch.Generator(device=device).manual_seed(req.seed)
    noise = torch.randn(sample_shape(model, req), generator=generator, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        out = sampler.sample(guided(denoise_batch, req.guidance if use_cfg else None, req.family), noise, generator, progress)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return Result(out, seconds, run.stats if run else None, run.speedup_bound() if run else 1.0)


def to_frames(family: str, sample: torch.Tensor) -> torch.Tensor:
    """One sample's pixels as (F, C, H, W) frames (F = 1 for images)."""
    if family == "latte":
        return sample[0]
    if family in ("latte_t2v", "wan"):
        return sample[0].transpose(0, 1)
    return sample[:1]
