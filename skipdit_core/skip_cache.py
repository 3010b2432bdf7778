"""Skip-Cache: the one rule deciding, at each denoising step, whether a Skip-DiT runs in full or
only its first and last k units, reusing the deep state of the last full step.

The mechanism (cutting a run at depth k) is `models.ustack.UStack`; this module holds the rule
and the per-run state, the same for every family (it reproduces the authors' released code):

- A step is **full** when there is no cache, when the step counter is a multiple of the interval
  n, or when the timestep is at or above the window's start; a full step refreshes the cache.
- Otherwise the step is **cached**: units [0, k) and [L-k, L) run, fed the remembered state.
- The counter advances once per denoising step (one model call: with classifier-free guidance
  both halves are one batch, so they share one decision and one cache entry). It counts from
  the first step, not from the window's start.
- After a step whose timestep is at or below the window's end, the cache is dropped and the
  counter reset, so every later step is full (the first such step may still be cached). The
  boundary is a per-family fact of the authors' code (`STRICT_END_FAMILIES`): their Latte
  class-to-video code drops the cache only below the end (t < 50), every other family at it.
- n = 1 never caches: outputs are identical to the uncached model.

Beyond the paper, `forecast` (default 0, the paper's reuse, bit for bit): a cached step is fed
the cut state *predicted* at its timestep by the polynomial through the last `forecast + 1` full
steps' cut states (Newton's divided differences in t, `CutForecast`): order 1 extrapolates the
last change linearly, order 2 also its curvature (TaylorSeer-style, in the timestep rather than
the step index, so uneven schedules are handled). The decision of a step never depends on it.
`forecast_damping` (default 1: the plain forecast) applies only that fraction of the forecast's
change from the last full state: h0 + damping (p(t) - h0). A full-order extrapolation overshoots
where the deep state's trajectory bends; on the realistic-depth twin at n = 3 over the whole schedule,
order 1 at damping 0.7 (chosen on held-out seeds) is closer to the uncached output than the plain
order 1 or 2 (docs/benchmarks.md, section 6).

Two more options, both off by default (the rule above, unchanged):
- `empty_steps` m: of the n - 1 cached steps of each interval, the last m run no unit at all; the
  stack's output is forecast instead, by the same polynomial through the last full steps' outputs
  (the final layer still runs, at the step's own timestep). A cached step costs 2k of L units, an
  empty one none: at equal block compute a schedule can then afford more full steps.
- `forecast_warmup`: a step that would be cached while the forecast holds fewer than order + 1 full
  steps runs in full instead, and the interval counts again from it. Without it the first cached
  steps of a run extrapolate from fewer points (order 0: the last full state itself).
With both, on the realistic-depth twins, for every peer setting measured (First Block Cache, PAB,
FasterCache, TaylorSeer, MagCache, cache-dit's DBCache) some setting at no more block compute is
closer to its uncached output (docs/benchmarks.md, section 5).

Timesteps are the training timesteps 0..1000 the model sees. The window is `start -> end`
(the paper's 700 -> 50). The percent form counts sampling progress: 0% is t = 1000, 100% is
t = 0, so 700 -> 50 is 30% -> 95%.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .diffusion import NUM_TRAIN_TIMESTEPS
from .models.ustack import StackCut, UStack

FORECAST_ORDERS = (0, 1, 2)
# What a full step remembers for the cached ones: the deep state h_{L-k} (the paper), or the middle's residual
# h_{L-k} - h_k, added to the cached step's own h_k (on a model without long skips, the first k units' work
# reaches the output only this way).
REUSE_KINDS = ("state", "residual")


class CutForecast:
    """The cut state as a polynomial in the timestep through the last `order + 1` full steps.

    Kept in Newton form: coeffs[0] is the newest state h0 (at t0, its own dtype), coeffs[j] the
    divided difference f[t0 .. tj] (float32), so a prediction is a Horner loop of `order`
    multiply-adds on one tensor and memory is order + 1 cut states. Fewer full steps than order + 1
    so far: the highest order they allow. Order 0 returns h0 itself (the paper's reuse).
    """

    def __init__(self, order: int, damping: float = 1.0):
        self.order = order
        self.damping = damping  # the fraction of p(t) - h0 added to h0
        self.ts: list[float] = []
        self.coeffs: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self.coeffs)

    @property
    def latest(self) -> Optional[torch.Tensor]:
        return self.coeffs[0] if self.coeffs else None

    def add(self, t: float, h: torch.Tensor) -> None:
        """A full step's cut state h (any shape) at timestep t. Another state at the newest timestep (a
        sampler evaluating one step twice) replaces the newest state and keeps the differences."""
        if self.ts and t == self.ts[0]:
            self.coeffs[0] = h
            return
        new = [h]
        if self.order:
            for j in range(min(len(self.coeffs), self.order)):
                lower = new[j].float() if j == 0 else new[j]
                new.append((self.coeffs[j].float() - lower) / (self.ts[j] - t))
        self.coeffs = new
        self.ts = [t] + self.ts[: self.order - 1] if self.order else [t]

    def predict(self, t: float) -> torch.Tensor:
        """The state at timestep t (a cached step's), in the dtype of the states."""
        h0 = self.coeffs[0]
        if len(self.coeffs) == 1:
            return h0
        out = self.coeffs[-1]
        for j in range(len(self.coeffs) - 2, 0, -1):
            out = torch.add(self.coeffs[j], out, alpha=t - self.ts[j])
        # one fused multiply-add (a float32 state: no copy); lower-precision states are added in float32
        return torch.add(h0.float(), out, alpha=self.damping * (t - self.ts[0])).to(h0.dtype)

    def clear(self) -> None:
        self.ts, self.coeffs = [], []


@dataclass(frozen=True)
class SkipCacheConfig:
    """interval: n (1 = off); start/end: the window in training timesteps; depth: k units
    (blocks, or (spatial, temporal) pairs for Latte) recomputed at each end."""

    interval: int = 2
    start: float = 700.0
    end: float = 50.0
    depth: int = 1
    forecast: int = 0  # 0: reuse the last full step's cut state (the paper); 1, 2: polynomial forecast order
    forecast_damping: float = 1.0  # fraction of the forecast's change applied (1: the polynomial itself)
    empty_steps: int = 0  # of each interval's n - 1 cached steps, the last m run no unit (the output is forecast)
    forecast_warmup: bool = False  # cache only once the forecast holds order + 1 full steps
    reuse: str = "state"  # "state": h_{L-k} itself (the paper); "residual": h_{L-k} - h_k (REUSE_KINDS)

    def __post_init__(self):
        if not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"Skip-Cache interval n must be an integer >= 1 (1 = no caching), got {self.interval!r}")
        if not isinstance(self.depth, int) or self.depth < 1:
            raise ValueError(f"Skip-Cache depth k must be an integer >= 1, got {self.depth!r}")
        if self.forecast not in FORECAST_ORDERS:
            raise ValueError(f"Skip-Cache forecast must be one of {FORECAST_ORDERS} (0 = reuse, as the paper), got {self.forecast!r}")
        if not 0.0 <= self.forecast_damping <= 1.0:
            raise ValueError(f"Skip-Cache forecast damping must be in 0..1 (1 = the plain forecast), got {self.forecast_damping!r}")
        if not isinstance(self.empty_steps, int) or not 0 <= self.empty_steps <= self.interval - 1:
            raise ValueError(
                f"Skip-Cache empty steps must be an integer in 0..n-1 = 0..{self.interval - 1} (of the n - 1 cached "
                f"steps of each interval, those that run no unit), got {self.empty_steps!r}"
            )
        if self.reuse not in REUSE_KINDS:
            raise ValueError(f"Skip-Cache reuse must be one of {REUSE_KINDS} (state = the paper's), got {self.reuse!r}")
        if not isinstance(self.forecast_warmup, bool):
            raise ValueError(f"Skip-Cache forecast warmup must be True or False, got {self.forecast_warmup!r}")
        for name in ("start", "end"):
            value = getattr(self, name)
            if not 0 <= value <= NUM_TRAIN_TIMESTEPS:
                raise ValueError(f"Skip-Cache {name} must be a timestep in 0..{NUM_TRAIN_TIMESTEPS}, got {value}")
        if self.start <= self.end:
            raise ValueError(
                f"Skip-Cache window start ({self.start}) must be above its end ({self.end}): "
                "denoising runs from t=1000 down to 0, and caching happens between them"
            )

    def describe(self) -> str:
        """The settings as the log lines and tables print them, e.g. "n=2 700->50 k=1 forecast=2"
        or "n=3 1000->0 k=1 forecast=1 damping=0.7 empty=1 warmup residual"."""
        damping = f" damping={self.forecast_damping:g}" if self.forecast and self.forecast_damping != 1.0 else ""
        extra = (f" empty={self.empty_steps}" if self.empty_steps else "") + (" warmup" if self.forecast_warmup else "")
        extra += " residual" if self.reuse == "residual" else ""
        return f"n={self.interval} {self.start:g}->{self.end:g} k={self.depth}" + (
            f" forecast={self.forecast}{damping}" if self.forecast else "") + extra

    @classmethod
    def from_percent(cls, start_percent: float, end_percent: float, interval: int = 2, depth: int = 1, **options):
        """The window as sampling progress in 0..1: 0.3 -> 0.95 is the paper's 700 -> 50. `options`: the
        other fields (forecast, forecast_damping, empty_steps, forecast_warmup)."""
        for name, p in (("start", start_percent), ("end", end_percent)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"Skip-Cache {name} percent must be in 0..1, got {p}")
        to_t = lambda p: round(NUM_TRAIN_TIMESTEPS * (1.0 - p), 6)  # noqa: E731
        return cls(interval=interval, start=to_t(start_percent), end=to_t(end_percent), depth=depth, **options)



# The authors' settings per family (window and depth; n is the user's choice, 2 by default).
AUTHORS_SETTINGS = {
    "latte_t2v": SkipCacheConfig(start=700, end=50, depth=1),
    "latte": SkipCacheConfig(start=900, end=50, depth=1),
    "dit": SkipCacheConfig(start=1000, end=20, depth=4),
    "hunyuan": SkipCacheConfig(start=700, end=50, depth=1),
    # No Skip-Cache setting for Wan was published: chosen on the trained Wan's tuning seeds (docs/wan-shapes.md). Flow
    # schedules spend most steps above t = 700, where the paper's 700 -> 50 caches nothing.
    "wan": SkipCacheConfig(start=1000, end=0, depth=1),
}


# Families whose authors' code drops the cache only when t < end (their `Latte_skip_cache`); the
# authors' Latte T2V, DiT and Hunyuan-DiT code drop it when t <= end. Matters where a schedule
# lands on t = end exactly (e.g. DDPM 100 lands on t = 50: one more cached step for Latte).
STRICT_END_FAMILIES = frozenset({"latte"})


def end_is_inclusive(family: Optional[str]) -> bool:
    """Whether the cache is dropped after a step at t == end, for a family (None: the common rule)."""
    return family not in STRICT_END_FAMILIES


@dataclass
class SkipCacheStats:
    full_steps: int = 0
    cached_steps: int = 0  # every step that is not full, the empty ones included
    blocks_run: int = 0  # blocks executed over the run
    blocks_uncached: int = 0  # blocks an uncached run executes
    schedule: list = field(default_factory=list)  # "F" (full) / "C" (cached) / "E" (empty) per step
    empty_steps: int = 0  # cached steps that ran no unit

    @property
    def steps(self) -> int:
        return self.full_steps + self.cached_steps

    @property
    def cached_fraction(self) -> float:
        return self.cached_steps / self.steps if self.steps else 0.0

    def speedup_bound(self, depth: int, num_units: int) -> float:
        """1 / ((1 - f) + (f - e) * c), c = 2k / L, f the cached and e the empty fraction of the steps:
        the speedup if only the blocks cost time."""
        c = 2 * depth / num_units
        f = self.cached_fraction
        e = self.empty_steps / self.steps if self.steps else 0.0
        return 1.0 / ((1.0 - f) + (f - e) * c)

    def summary(self) -> str:
        empty = f" ({self.empty_steps} of them empty)" if self.empty_steps else ""
        return (
            f"{self.full_steps} full, {self.cached_steps} cached{empty} of {self.steps} steps; "
            f"{self.blocks_run} of {self.blocks_uncached} blocks run"
        )


class SkipCacheRun:
    """The state of one sampling run: the cache, the step counter, the statistics.

    Make one per run (two runs never share a cache). Per denoising step:
        cut = run.begin_step(t)          # None (no cut: n = 1) or a StackCut
        out = model(..., cut=cut)
        run.end_step(cut)
    A sampler that calls the model again for the same step takes `run.repeat_step()` instead of
    `begin_step` (the same decision, the same state).
    """

    def __init__(self, config: SkipCacheConfig, stack: UStack, blocks_per_unit: int = 1, family: Optional[str] = None):
        stack.check_depth(config.depth)
        self.config = config
        self.end_inclusive = end_is_inclusive(family)
        self.stack = stack
        self.blocks_per_unit = blocks_per_unit
        self.history = CutForecast(config.forecast, config.forecast_damping)
        # the stack's outputs at the full steps, when some steps are empty
        self.outputs = CutForecast(config.forecast, config.forecast_damping) if config.empty_steps else None
        self.current: Optional[torch.Tensor] = None  # the deep state this step was fed, if it is cached
        self.current_output: Optional[torch.Tensor] = None  # the output this step was handed, if it is empty
        self.counter = 0
        self._t = float(NUM_TRAIN_TIMESTEPS)
        self.stats = SkipCacheStats()

    @property
    def cache(self) -> Optional[torch.Tensor]:
        """The last full step's cut state (None: no cache)."""
        return self.history.latest

    @classmethod
    def for_model(cls, config: SkipCacheConfig, model) -> "SkipCacheRun":
        return cls(config, model.stack, getattr(model, "blocks_per_unit", 1), getattr(model, "family", None))

    def begin_step(self, t) -> Optional[StackCut]:
        """Decide the step at timestep t (a number or a (B,) tensor of equal values): returns
        None (n = 1: no cut), a capturing StackCut (full step) or a cached StackCut."""
        self._t = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)
        cfg = self.config
        position = self.counter % cfg.interval
        may_cache = cfg.interval > 1 and position != 0 and self._t < cfg.start
        needed = cfg.forecast + 1 if cfg.forecast_warmup else 1
        cached = may_cache and len(self.history) >= needed
        if may_cache and not cached and cfg.forecast_warmup:
            self.counter = 0  # this full step starts the interval again
        self.counter += 1
        empty = cached and position >= cfg.interval - cfg.empty_steps
        units = 0 if empty else 2 * cfg.depth if cached else self.stack.num_units
        self.stats.blocks_run += units * self.blocks_per_unit
        self.stats.blocks_uncached += self.stack.num_units * self.blocks_per_unit
        self.stats.schedule.append("E" if empty else "C" if cached else "F")
        self.stats.cached_steps += cached
        self.stats.empty_steps += empty
        self.stats.full_steps += not cached
        self.current = self.history.predict(self._t) if cached and not empty else None
        self.current_output = self.outputs.predict(self._t) if empty else None
        return self.repeat_step()

    def repeat_step(self) -> Optional[StackCut]:
        """The cut of the step last decided, for another model call of that step (a sampler evaluating
        the model twice at one timestep): the same decision on the same state. A full one captures again,
        which refreshes the newest state of the history."""
        if self.config.interval == 1:
            return None
        return StackCut(self.config.depth, cached=self.current, output=self.current_output,
                        residual=self.config.reuse == "residual")

    def end_step(self, cut: Optional[StackCut]) -> None:
        """After the model call: keep a full step's deep state; past the window, drop it."""
        if cut is not None and cut.kind == "full":
            self.history.add(self._t, cut.captured)
            if self.outputs is not None:
                self.outputs.add(self._t, cut.captured_output)
        end = self.config.end
        if self._t < end or (self.end_inclusive and self._t == end):
            self.history.clear()
            if self.outputs is not None:
                self.outputs.clear()
            self.current, self.current_output, self.counter = None, None, 0

    def speedup_bound(self) -> float:
        return self.stats.speedup_bound(self.config.depth, self.stack.num_units)


def simulate(
    config: SkipCacheConfig, timesteps: Sequence[float], num_units: int = 28, num_skips: int = 14,
    family: Optional[str] = None,
) -> SkipCacheStats:
    """The full/cached schedule a run over `timesteps` gets, without a model (the same rule)."""
    run = SkipCacheRun(config, UStack(num_units, num_skips), family=family)
    for t in timesteps:
        cut = run.begin_step(t)
        if cut is not None and cut.kind == "full":
            cut.captured = cut.captured_output = torch.empty(0)  # stand in for the states a full step remembers
        run.end_step(cut)
    return run.stats
