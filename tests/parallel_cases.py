"""Tiny models of every family and what to sample with them, for tests/test_parallel.py; run as a
script under `torch.distributed.run` it samples every case with CFG parallel and with sequence parallel
and saves what process 0 got (with a check that every process got the same):

    python -m torch.distributed.run --nproc_per_node 2 tests/parallel_cases.py OUT.pt
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers import randomize  # noqa: E402
from skipdit_core import models  # noqa: E402
from skipdit_core.pipeline import Request  # noqa: E402
from skipdit_core.skip_cache import SkipCacheConfig  # noqa: E402

CACHES = {"uncached": None, "n2": SkipCacheConfig(interval=2, start=1000, end=0, depth=1)}


def _text(seed: int, **shapes) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        out[name] = torch.randn(*shape, generator=g)
        out[f"negative_{name}"] = torch.randn(*shape, generator=g)
    return out


def cases() -> dict:
    """name -> (family, preset, config overrides, Request); every model has long skips."""
    t2v = _text(5, prompt_embeds=(1, 6, 32))
    t2v["prompt_attention_mask"] = torch.tensor([[1, 1, 1, 1, 0, 0]])
    hy = _text(6, prompt_embeds=(1, 7, 32), prompt_embeds_2=(1, 9, 48))
    hy["prompt_attention_mask"] = torch.tensor([[1] * 5 + [0] * 2])
    hy["prompt_attention_mask_2"] = torch.tensor([[1] * 6 + [0] * 3])
    # 25 DDIM steps: with few, the first step's x0 (x / sqrt(alpha_bar(999)), 150x) makes float rounding of a
    # different batch shape (1e-7) visible in the sample; the step from t 999 to 959 scales it by 2 only.
    common = dict(sampler="ddim", steps=25, guidance=3.0, seed=3)
    return {
        "dit": ("dit", "DiT-tiny", {"skip": True}, Request("dit", label=3, size=8, **common)),
        "latte": ("latte", "Latte-tiny", {"skip": True}, Request("latte", label=1, frames=4, size=8, **common)),
        "latte_t2v": ("latte_t2v", "Latte-T2V-tiny", {"skip": True},
                      Request("latte_t2v", text=t2v, frames=4, size=8, **common)),
        "hunyuan": ("hunyuan", "HunyuanDiT-tiny", {}, Request("hunyuan", text=hy, size=16, **common)),
    }


def build(family: str, preset: str, overrides: dict) -> torch.nn.Module:
    config = models.make_config(family, overrides, preset=preset)
    torch.manual_seed(0)
    return randomize(models.build_model(family, config), seed=1).eval()


def main(out_path: str) -> None:
    import torch.distributed as dist

    from skipdit_core.parallel import CFGParallel, SequenceParallel
    from skipdit_core.pipeline import generate
    from skipdit_core.parallel import Processes

    procs = Processes.from_environment()
    procs.join(torch.device("cpu"))
    results = {}
    for name, (family, preset, overrides, req) in cases().items():
        for mode in ("cfg", "sequence"):
            model = build(family, preset, overrides)
            split = CFGParallel() if mode == "cfg" else None
            if mode == "sequence":
                SequenceParallel().attach(model)
            for cache_name, cache in CACHES.items():
                sample = generate(model, req, cache, cfg_parallel=split).sample
                every = procs.gather(sample)
                assert all(torch.equal(every[0], s) for s in every), f"{name} {mode} {cache_name}: processes differ"
                results[f"{name}/{mode}/{cache_name}"] = sample
    if procs.main:
        torch.save(results, out_path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
