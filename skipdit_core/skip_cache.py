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
        """A full step's cut state h (any shape) at timestep t."""
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
            out = self.coeffs[j] + (t - self.ts[j]) * out
        return (h0.float() + self.damping * (t - self.ts[0]) * out).to(h0.dtype)

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

    def __post_init__(self):
        if not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"Skip-Cache interval n must be an integer >= 1 (1 = no caching), got {self.interval!r}")
        if not isinstance(self.depth, int) or self.depth < 1:
            raise ValueError(f"Skip-Cache depth k must be an integer >= 1, got {self.depth!r}")
        if self.forecast not in FORECAST_ORDERS:
            raise ValueError(f"Skip-Cache forecast must be one of {FORECAST_ORDERS} (0 = reuse, as the paper), got {self.forecast!r}")
        if not 0.0 <= self.forecast_damping <= 1.0:
            raise ValueError(f"Skip-Cache forecast damping must be in 0..1 (1 = the plain forecast), got {self.forecast_damping!r}")
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
        """The settings as the log lines and tables print them, e.g. "n=2 700->50 k=1 forecast=2"."""
        damping = f" damping={self.forecast_damping:g}" if self.forecast and self.forecast_damping != 1.0 else ""
        return f"n={self.interval} {self.start:g}->{self.end:g} k={self.depth}" + (
            f" forecast={self.forecast}{damping}" if self.forecast else "")

    @classmethod
    def from_percent(cls, start_percent: float, end_percent: float, interval: int = 2, depth: int = 1, forecast: int = 0,
                     forecast_damping: float = 1.0):
        """The window as sampling progress in 0..1: 0.3 -> 0.95 is the paper's 700 -> 50."""
        for name, p in (("start", start_percent), ("end", end_percent)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"Skip-Cache {name} percent must be in 0..1, got {p}")
        to_t = lambda p: round(NUM_TRAIN_TIMESTEPS * (1.0 - p), 6)  # noqa: E731
        return cls(interval=interval, start=to_t(start_percent), end=to_t(end_percent), depth=depth, forecast=forecast,
                   forecast_damping=forecast_damping)



# The authors' settings per family (window and depth; n is the user's choice, 2 by default).
AUTHORS_SETTINGS = {
    "latte_t2v": SkipCacheConfig(start=700, end=50, depth=1),
    "latte": SkipCacheConfig(start=900, end=50, depth=1),
    "dit": SkipCacheConfig(start=1000, end=20, depth=4),
    "hunyuan": SkipCacheConfig(start=700, end=50, depth=1),
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
    cached_steps: int = 0
    blocks_run: int = 0  # blocks executed over the run
    blocks_uncached: int = 0  # blocks an uncached run executes
    schedule: list = field(default_factory=list)  # "F" / "C" per step

    @property
    def steps(self) -> int:
        return self.full_steps + self.cached_steps

    @property
    def cached_fraction(self) -> float:
        return self.cached_steps / self.steps if self.steps else 0.0

    def speedup_bound(self, depth: int, num_units: int) -> float:
        """1 / ((1 - f) + f * c), c = 2k / L: the speedup if only the blocks cost time."""
        c = 2 * depth / num_units
        f = self.cached_fraction
        return 1.0 / ((1.0 - f) + f * c)

    def summary(self) -> str:
        return (
            f"{self.full_steps} full, {self.cached_steps} cached of {self.steps} steps; "
            f"{self.blocks_run} of {self.blocks_uncached} blocks run"
        )


class SkipCacheRun:
    """The state of one sampling run: the cache, the step counter, the statistics.

    Make one per run (two runs never share a cache). Per denoising step:
        cut = run.begin_step(t)          # None (no cut: n = 1) or a StackCut
        out = model(..., cut=cut)
        run.end_step(cut)
    """

    def __init__(self, config: SkipCacheConfig, stack: UStack, blocks_per_unit: int = 1, family: Optional[str] = None):
        stack.check_depth(config.depth)
        self.config = config
        self.end_inclusive = end_is_inclusive(family)
        self.stack = stack
        self.blocks_per_unit = blocks_per_unit
        self.history = CutForecast(config.forecast, config.forecast_damping)
        self.current: Optional[torch.Tensor] = None  # the deep state this step was fed, if it is cached
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
        cached = (
            cfg.interval > 1
            and self.cache is not None
            and self.counter % cfg.interval != 0
            and self._t < cfg.start
        )
        self.counter += 1
        units = 2 * cfg.depth if cached else self.stack.num_units
        self.stats.blocks_run += units * self.blocks_per_unit
        self.stats.blocks_uncached += self.stack.num_units * self.blocks_per_unit
        self.stats.schedule.append("C" if cached else "F")
        if cached:
            self.stats.cached_steps += 1
            self.current = self.history.predict(self._t)
            return StackCut(cfg.depth, cached=self.current)
        self.stats.full_steps += 1
        self.current = None
        return StackCut(cfg.depth) if cfg.interval > 1 else None

    def end_step(self, cut: Optional[StackCut]) -> None:
        """After the model call: keep a full step's deep state; past the window, drop it."""
        if cut is not None and cut.cached is None:
            self.history.add(self._t, cut.captured)
        end = self.config.end
        if self._t < end or (self.end_inclusive and self._t == end):
            self.history.clear()
            self.current, self.counter = None, 0

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
        if cut is not None and cut.cached is None:
            cut.captured = torch.empty(0)  # stands in for the deep state a full step remembers
        run.end_step(cut)
    return run.stats
