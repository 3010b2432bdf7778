"""Feature dynamics along one sampling trajectory (the paper's Figure 4), and the Skip-Cache settings
they suggest.

`record_dynamics` samples once, uncached, and compares every unit's output with its own output at the
previous steps:

    similarity[lag - 1, u, s] = mean over tokens of cos(h_u at step s, h_u at step s - lag)

(NaN where s < lag). Skip-Cache with depth k reuses the output of unit L-k-1, the deep state entering
unit L-k, for up to n-1 steps after a full step; so that unit's row at lags 1..n-1 says where caching
is safe and for how long. `suggest` turns it into a window (start -> end) and an interval n, and
`plot_dynamics` draws the heatmaps. `compare_forecasts` replays the suggestion with each forecast
order of the cut state, to say which one to use.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .pipeline import Request, generate
from .plots import pyplot, save
from .skip_cache import SkipCacheConfig, SkipCacheStats, simulate


@dataclass
class FeatureDynamics:
    """timesteps: (S,) of the trajectory, in sampling order. similarity: (max_lag, U, S) float32."""

    timesteps: list[int]
    similarity: torch.Tensor
    num_skips: int
    seconds: float
    family: Optional[str] = None  # the model's, for its window-end rule
    sample: Optional[torch.Tensor] = None  # the uncached output of the recorded trajectory

    @property
    def num_units(self) -> int:
        return self.similarity.shape[1]

    @property
    def max_lag(self) -> int:
        return self.similarity.shape[0]

    def cached_unit(self, depth: int = 1) -> int:
        """The unit whose output Skip-Cache with depth k reuses."""
        return self.num_units - depth - 1

    def mean_similarity(self, unit: int, lag: int = 1, steps: Optional[Sequence[int]] = None) -> float:
        """Mean of unit's similarity at this lag over the steps (default: all that have one)."""
        row = self.similarity[lag - 1, unit]
        if steps is not None:
            row = row[list(steps)]
        row = row[~row.isnan()]
        return float(row.mean()) if row.numel() else math.nan


@dataclass
class Suggestion:
    """Skip-Cache settings read off the dynamics, with the figures that justify them."""

    interval: int
    start: int
    end: int
    depth: int
    threshold: float
    window_similarity: float  # mean similarity of the cached unit at lag n-1 inside the window
    stats: SkipCacheStats     # the schedule these settings give on the recorded trajectory
    speedup_bound: float

    @property
    def config(self) -> SkipCacheConfig:
        return SkipCacheConfig(interval=self.interval, start=self.start, end=self.end, depth=self.depth)


def token_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over tokens of the cosine similarity of two (..., D) feature tensors of equal shape."""
    return float(torch.nn.functional.cosine_similarity(a.flatten(0, -2), b.flatten(0, -2), dim=-1, eps=1e-8).mean())


def record_dynamics(model, req: Request, max_lag: int = 5,
                    progress: Optional[Callable[[int, int, int], None]] = None) -> FeatureDynamics:
    """Sample once without a cache and compare each unit's output across steps (see the module doc).

    Keeps the last max_lag outputs of every unit (memory: max_lag x units x one unit output)."""
    if max_lag < 1:
        raise ValueError(f"max_lag must be >= 1, got {max_lag}")
    stack = model.stack
    units = stack.num_units
    history = [deque(maxlen=max_lag) for _ in range(units)]
    rows: list[torch.Tensor] = []  # per step: (max_lag, U)
    timesteps: list[int] = []

    def observe(i: int, h: torch.Tensor) -> None:
        if i == 0:
            rows.append(torch.full((max_lag, units), math.nan))
        h = h.detach().float()
        for lag, past in enumerate(reversed(history[i]), start=1):
            rows[-1][lag - 1, i] = token_cosine(h, past)
        history[i].append(h)

    def on_step(i: int, total: int, t: int) -> None:
        timesteps.append(int(t))
        if progress is not None:
            progress(i, total, t)

    stack.observers.append(observe)
    try:
        result = generate(model, req, progress=on_step)
    finally:
        stack.observers.remove(observe)
    if len(rows) != len(timesteps):  # one model call per step is what the step bookkeeping assumes
        raise RuntimeError(f"recorded {len(rows)} model calls for {len(timesteps)} steps")
    return FeatureDynamics(timesteps, torch.stack(rows, dim=-1), stack.num_skips, result.seconds,
                           getattr(model, "family", None), result.sample)


def _longest_run(flags: list[bool]) -> Optional[tuple[int, int]]:
    """(first, last) index of the longest run of True, or None."""
    best, start = None, None
    for i, flag in enumerate(flags + [False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            if best is None or i - 1 - start > best[1] - best[0]:
                best = (start, i - 1)
            start = None
    return best


def suggest(dyn: FeatureDynamics, threshold: float = 0.99, depth: int = 1) -> Optional[Suggestion]:
    """The caching window and interval where the reused feature is smooth, or None (no long skips,
    or no step where it is).

    Window: the longest run of steps [a, b] whose cached-unit similarity to the previous step is at
    least `threshold`; start = the timestep of step a-1 (the full step that fills the cache; every
    step below it may be cached), end = the timestep of step b (the last step that may be cached).
    Interval: the largest n (up to max_lag + 1) whose reuse distance n-1 keeps the mean similarity
    over the window at or above the threshold."""
    if dyn.num_skips == 0:
        return None
    if not 1 <= depth <= dyn.num_skips:
        raise ValueError(f"depth k={depth} is out of range: the model has {dyn.num_skips} long skips")
    unit = dyn.cached_unit(depth)
    lag1 = dyn.similarity[0, unit]
    run = _longest_run([bool(v >= threshold) for v in lag1])  # NaN (step 0) compares False
    if run is None:
        return None
    a, b = run
    interval, window_similarity = 1, float("nan")
    for n in range(2, dyn.max_lag + 2):
        lag = n - 1
        mean = dyn.mean_similarity(unit, lag, range(a + lag - 1, b + 1))  # reuses of a state from step >= a-1
        if math.isnan(mean) or mean < threshold:
            break
        interval, window_similarity = n, mean
    if interval == 1:
        return None
    start, end = dyn.timesteps[a - 1], dyn.timesteps[b]
    config = SkipCacheConfig(interval=interval, start=start, end=end, depth=depth)
    stats = simulate(config, dyn.timesteps, dyn.num_units, dyn.num_skips, dyn.family)
    return Suggestion(interval, start, end, depth, threshold, window_similarity, stats,
                      stats.speedup_bound(depth, dyn.num_units))


def _replay_psnr(model, req: Request, configs: dict, reference: Optional[torch.Tensor]) -> dict:
    """{key: PSNR (dB) of the output under configs[key] against the uncached output of `req`}."""
    from .media import psnr

    ref = reference if reference is not None else generate(model, req).sample
    data_range = float(ref.max() - ref.min()) or 1.0
    return {key: psnr(generate(model, req, config).sample, ref, data_range) for key, config in configs.items()}


def compare_forecasts(model, req: Request, config: SkipCacheConfig, orders=(0, 1, 2),
                      reference: Optional[torch.Tensor] = None) -> dict[int, float]:
    """PSNR (dB) of the output with each forecast order of `config` against the uncached output, on the
    trajectory of `req`: whether forecasting the cut state pays off on this model and schedule (it
    gains in wide windows and can lose where n-1 cached steps extrapolate far). `reference`: that
    uncached output when already sampled (`FeatureDynamics.sample`), else it is sampled here."""
    from dataclasses import replace

    return _replay_psnr(model, req, {order: replace(config, forecast=order) for order in orders}, reference)


DAMPINGS = (1.0, 0.85, 0.7, 0.55)


def compare_dampings(model, req: Request, config: SkipCacheConfig, dampings=DAMPINGS,
                     reference: Optional[torch.Tensor] = None) -> dict[float, float]:
    """PSNR (dB) with each forecast_damping of `config` (a forecast order >= 1) against the uncached
    output of `req`: a full-order extrapolation overshoots where the deep state bends, and how much
    of it to apply depends on the model, so it is measured on this trajectory, not assumed."""
    from dataclasses import replace

    if config.forecast == 0:
        raise ValueError("forecast_damping only acts on a forecast: give a config with forecast 1 or 2")
    return _replay_psnr(model, req, {d: replace(config, forecast_damping=d) for d in dampings}, reference)


def plot_dynamics(panels: Sequence[tuple[str, FeatureDynamics]], path: str,
                  suggestion: Optional[Suggestion] = None, depth: int = 1) -> None:
    """Heatmaps (unit x step) of each unit's change since the previous step, 1 - cosine similarity on a
    log colour scale (the similarities of a trained model sit between 0.95 and 1, where a linear scale
    shows one colour), one panel per model on one scale; the first panel marks the reused unit (dashed)
    and the suggested window (solid lines)."""
    plt = pyplot()
    from matplotlib.colors import LogNorm

    changes = [(1 - dyn.similarity[0]).clamp_min(1e-7) for _, dyn in panels]
    finite = torch.cat([c[~c.isnan()] for c in changes])
    norm = LogNorm(vmin=max(float(finite.min()), 1e-7), vmax=max(float(finite.max()), 2e-7))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    for k, ((name, dyn), change, ax) in enumerate(zip(panels, changes, axes[0])):
        image = ax.imshow(change.numpy(), aspect="auto", origin="lower", cmap="magma_r", norm=norm,
                          interpolation="nearest")
        ticks = list(range(0, len(dyn.timesteps), max(1, len(dyn.timesteps) // 8)))
        ax.set_xticks(ticks, [str(dyn.timesteps[i]) for i in ticks])
        ax.set_yticks(range(dyn.num_units))
        ax.set_xlabel("timestep (sampling order)")
        ax.set_ylabel("unit (0 = first)")
        title = name
        if k == 0 and suggestion is not None:
            ax.axhline(dyn.cached_unit(depth), color="tab:cyan", linestyle="--", linewidth=1.5)
            for t in (suggestion.start, suggestion.end):
                ax.axvline(dyn.timesteps.index(t), color="tab:cyan", linewidth=1.5)
            title += f"\nsuggested Skip-Cache: n={suggestion.interval}, {suggestion.start} -> {suggestion.end}, k={depth}"
        ax.set_title(title, fontsize=10)
        fig.colorbar(image, ax=ax, label="1 - cosine similarity to the previous step")
    save(fig, path)
