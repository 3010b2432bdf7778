"""Choosing a Skip-Cache setting for a block-compute budget on several trajectories (classes x seeds).

One setting tuned on one trajectory overfits it: on unseen seeds the choice can be worse than a plain one
at the same compute (docs/benchmarks.md). So a setting is chosen here on many trajectories, by their mean
PSNR to the model's own uncached output, and every table carries the spread over trajectories.

    cands = candidates(model.stack.num_skips > 0)
    rows = search(model, requests, budget=1 / 3, candidates=cands)     # rows[0]: the chosen setting
    print(rows[0]["config"].describe(), rows[0]["psnr"], rows[0]["psnr_min"])

- Block compute of a setting (blocks run / blocks an uncached run executes) depends only on the schedule,
  so it is read off `simulate()` on the requests' timesteps, without running the model.
- Among the candidates within the budget, those closest to the budget go on (a much cheaper setting
  rarely wins at a budget), then successive halving: all are scored on the first trajectories, the better
  half goes on to twice as many, until one is left or the time budget is spent; the ranking is always by
  the mean over the same trajectories. A setting is scored once per trajectory: a round adds only the
  trajectories it had not been scored on.

`benchmarks/presets.py` makes the presets of `skip_cache_presets.py` with this search on tuning seeds and
reports them on held-out seeds; `skipdit analyze --speed` runs it on the user's own model.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from .media import psnr, ssim
from .pipeline import Request, generate, to_frames
from .skip_cache import SkipCacheConfig, simulate

FORECAST_VARIANTS = ((0, 1.0), (1, 0.7), (1, 1.0), (2, 0.7))  # (order, damping) tried per interval


def candidates(has_skips: bool, intervals: Sequence[int] = range(2, 9), start: float = 1000.0, end: float = 0.0,
               depth: int = 1) -> list[SkipCacheConfig]:
    """The settings a search tries, over the whole schedule (`start -> end`): every interval n with each forecast
    variant, and, with a forecast, every number of empty steps 1..n-1 with the forecast warm-up. A model without
    long skips reuses its deep state (`reuse` "state", the closer of the two on the trained Wan)."""
    out = []
    for n in intervals:
        for order, damping in FORECAST_VARIANTS:
            base = dict(interval=n, start=start, end=end, depth=depth, forecast=order, forecast_damping=damping)
            out.append(SkipCacheConfig(**base))
            if order:
                out += [SkipCacheConfig(**base, empty_steps=m, forecast_warmup=True) for m in range(1, n)]
    return out


def block_compute(config: SkipCacheConfig, timesteps: Sequence[float], num_units: int, num_skips: int,
                  family: Optional[str]) -> float:
    """Blocks run over blocks an uncached run executes, for one trajectory over `timesteps`."""
    stats = simulate(config, timesteps, num_units, num_skips, family)
    return stats.blocks_run / stats.blocks_uncached


def _generate_recording_timesteps(model, req: Request):
    """(the uncached run of `req`, the timesteps the model was called at)."""
    seen: list[float] = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(float(
        (args[1] if len(args) > 1 else kwargs["t"]).reshape(-1)[0])), with_kwargs=True)
    try:
        return generate(model, req), seen
    finally:
        hook.remove()


@dataclass
class Reference:
    """The uncached frames of each request, made once and shared by every setting scored against them; the run of
    the first request also gives the schedule's timesteps (every request has the same sampler and steps)."""

    model: object
    requests: list
    frames: list = field(default_factory=list)
    timesteps: list = field(default_factory=list)

    def get(self, i: int) -> torch.Tensor:
        while len(self.frames) <= i:
            req = self.requests[len(self.frames)]
            if self.frames:
                result = generate(self.model, req)
            else:
                result, self.timesteps = _generate_recording_timesteps(self.model, req)
            self.frames.append(to_frames(req.family, result.sample).clamp(-1, 1))
        return self.frames[i]

    def schedule(self) -> list[float]:
        """The timesteps of the requests' schedule (from the first request's uncached run)."""
        self.get(0)
        return self.timesteps


def _trajectory_scores(model, config: SkipCacheConfig, ref: Reference, indices) -> tuple[list[float], list[float]]:
    """(PSNRs, SSIMs) of `config` against the uncached frames of the requests at `indices`."""
    psnrs, ssims = [], []
    for i in indices:
        req = ref.requests[i]
        frames = to_frames(req.family, generate(model, req, config).sample).clamp(-1, 1)
        psnrs.append(min(psnr(ref.get(i), frames), 99.0))  # identical = 99 dB
        ssims.append(ssim(ref.get(i), frames))
    return psnrs, ssims


def _summary(psnrs: list[float], ssims: list[float]) -> dict:
    count = len(psnrs)
    return {"psnr": sum(psnrs) / count, "psnr_min": min(psnrs), "psnr_max": max(psnrs),
            "ssim": sum(ssims) / count, "ssim_min": min(ssims), "ssim_max": max(ssims), "trajectories": count}


def score(model, config: SkipCacheConfig, ref: Reference, count: int) -> dict:
    """PSNR / SSIM of `config` against the uncached frames on the first `count` requests: mean, min, max."""
    return _summary(*_trajectory_scores(model, config, ref, range(count)))


def search(model, requests: Sequence[Request], budget: float, candidates: Sequence[SkipCacheConfig],
           keep: int = 8, first: int = 2, seconds: Optional[float] = None, reference: Optional[Reference] = None,
           log: Callable[[str], None] = lambda _: None) -> list[dict]:
    """Rank the candidates using at most `budget` of the block compute on `requests`: rows (config, compute,
    psnr, psnr_min, psnr_max, ssim, ssim_min, ssim_max, trajectories), best first.

    keep: how many of the candidates closest to the budget enter; first: trajectories of the first round;
    seconds: a time budget (the rounds stop when the next would pass it; the rows then hold the trajectories
    scored so far); reference: uncached frames already made for these requests."""
    if not 0 < budget <= 1:
        raise ValueError(f"a block-compute budget is a fraction in (0, 1], got {budget}")
    stack = model.stack
    family = getattr(model, "family", None)
    ref = reference or Reference(model, list(requests))
    timesteps = ref.schedule()
    costed = [(block_compute(c, timesteps, stack.num_units, stack.num_skips, family), c) for c in candidates
              if c.depth <= stack.max_depth]
    within = sorted([(f, c) for f, c in costed if f <= budget], key=lambda fc: -fc[0])[:keep]
    if not within:
        cheapest = min(f for f, _ in costed) if costed else math.nan
        raise ValueError(f"no candidate uses at most {budget:.0%} of the block compute (the cheapest uses {cheapest:.0%})")
    # (row, its PSNRs, its SSIMs so far): each round scores a setting only on the trajectories it has not seen
    alive = [({"config": c, "compute": f}, [], []) for f, c in within]
    count, started = min(first, len(requests)), time.perf_counter()
    while True:
        round_started = time.perf_counter()
        for row, psnrs, ssims in alive:
            more_psnrs, more_ssims = _trajectory_scores(model, row["config"], ref, range(len(psnrs), count))
            psnrs += more_psnrs
            ssims += more_ssims
            row.update(_summary(psnrs, ssims))
        alive.sort(key=lambda entry: (-entry[0]["psnr"], -entry[0]["ssim"]))
        best = alive[0][0]
        log(f"{count} trajectories: best {best['config'].describe()} {best['psnr']:.2f} dB of {len(alive)}")
        if count == len(requests):
            break
        now = time.perf_counter()
        spent = now - started
        # the next round scores half the settings on as many new trajectories each: about this round's time
        if seconds is not None and spent + 1.1 * (now - round_started) > seconds:
            log(f"time budget: stopping after {spent:.0f} s with {count} of {len(requests)} trajectories")
            break
        alive = alive[: max(1, len(alive) // 2)]
        count = min(2 * count, len(requests))
    return [row for row, _, _ in alive]
