"""The bundled demo model and the main job: one video without and with Skip-Cache, side by side.

`skipdit_core/assets/` ships two small class-conditional pixel-space Latte models (8 frames, 16x16 RGB,
4 classes, each shape in its own colour: red circle, green square, blue triangle, yellow cross), trained on the synthetic moving shapes with `training/` (recipes
`training/configs/demo-{skip,vanilla}-latte.yaml`; how they were made: docs/demo-model.md):

    skip-latte-shapes.safetensors     Skip-Latte: 6 (spatial, temporal) pairs, 3 long skips
    latte-shapes-vanilla.safetensors  its vanilla twin: no skips, same recipe and budget (for benchmarks)

No VAE and no download: the model's output is the video.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch

from .loading import load_model
from .media import psnr, ssim, write_video
from .pipeline import Request, generate, to_frames
from .skip_cache import AUTHORS_SETTINGS, SkipCacheConfig

ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_MODEL = ASSETS / "skip-latte-shapes.safetensors"
VANILLA_TWIN = ASSETS / "latte-shapes-vanilla.safetensors"
SHAPE_CLASSES = ("circle", "square", "triangle", "cross")  # label i of the demo models
DEMO_CACHE = SkipCacheConfig(interval=2, start=AUTHORS_SETTINGS["latte"].start, end=AUTHORS_SETTINGS["latte"].end, depth=1)


def class_label(name_or_index: str | int) -> int:
    """'circle' / 'square' / 'triangle' / 'cross' or 0..3 -> the label."""
    if isinstance(name_or_index, int) or str(name_or_index).isdigit():
        label = int(name_or_index)
        if not 0 <= label < len(SHAPE_CLASSES):
            raise ValueError(f"class {label} out of range: the demo model has 0..{len(SHAPE_CLASSES) - 1} ({', '.join(SHAPE_CLASSES)})")
        return label
    if name_or_index not in SHAPE_CLASSES:
        raise ValueError(f"unknown class {name_or_index!r}: the demo model knows {', '.join(SHAPE_CLASSES)}")
    return SHAPE_CLASSES.index(name_or_index)


@dataclass
class DemoResult:
    uncached_path: str
    cached_path: str
    uncached_seconds: float
    cached_seconds: float
    psnr: float
    ssim: float
    summary: str  # the cache statistics of the cached run
    speedup_bound: float

    @property
    def speedup(self) -> float:
        return self.uncached_seconds / self.cached_seconds


def run_demo(
    out_dir: str = "outputs",
    label: str | int = "circle",
    cache: SkipCacheConfig = DEMO_CACHE,
    steps: int = 50,
    sampler: str = "ddim",
    guidance: float = 4.0,
    seed: int = 0,
    repeats: int = 3,
    model_path: Optional[str | os.PathLike] = None,
    scale: Optional[int] = None,
) -> DemoResult:
    """Generate the same seed without and with Skip-Cache, write both mp4s, and measure.

    Timing: one warm-up run, then `repeats` alternating runs of each; the fastest of each is kept, so
    the ratio compares like with like on a busy machine. The mp4s are upscaled `scale` times (nearest
    neighbour; default: to at least 128 px, as a 16 px video is a dot in most players); PSNR / SSIM
    compare the model's own frames."""
    label = class_label(label)
    model, _ = load_model(model_path or DEMO_MODEL, dtype=torch.float32)
    c = model.config
    req = Request("latte", label=label, frames=c.num_frames, size=c.input_size, sampler=sampler, steps=steps,
                  guidance=guidance, seed=seed)
    generate(model, replace(req, steps=5))  # warm-up: allocator, kernels, first-call costs
    best = {"uncached": None, "cached": None}
    for _ in range(max(1, repeats)):
        for name, cfg in (("uncached", None), ("cached", cache)):
            result = generate(model, req, cfg)
            if best[name] is None or result.seconds < best[name].seconds:
                best[name] = result
    base, fast = best["uncached"], best["cached"]
    os.makedirs(out_dir, exist_ok=True)
    stem = f"demo-{SHAPE_CLASSES[label]}-seed{seed}"
    paths, frames = {}, {}
    scale = scale or max(1, -(-128 // c.input_size))
    for name, result in best.items():
        paths[name] = os.path.join(out_dir, f"{stem}-{name}.mp4")
        frames[name] = to_frames("latte", result.sample).clamp(-1, 1)
        write_video(paths[name], torch.nn.functional.interpolate(frames[name], scale_factor=scale, mode="nearest"),
                    fps=8)
    a, b = frames["uncached"], frames["cached"]
    return DemoResult(paths["uncached"], paths["cached"], base.seconds, fast.seconds, psnr(a, b), ssim(a, b),
                      fast.stats.summary(), fast.speedup_bound)
