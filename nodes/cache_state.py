"""The per-run state of Apply Skip-Cache inside ComfyUI, without ComfyUI.

The rule (full or cached, when the cache is dropped) is `skipdit_core.skip_cache.SkipCacheRun`, used as
it is. What ComfyUI adds, and what this module handles:

- **Batch compositions.** ComfyUI evaluates cond and uncond in one batch when memory allows, else in
  separate batches (and conditionings that cannot be concatenated always separately). Every composition
  (the uuids of the conds in the batch and the input shape) gets its own `SkipCacheRun`, so cond and
  uncond never share deep features. All compositions see the same timesteps, so they make the same
  decisions.
- **Step identity by sigma.** A step is a new sigma for a composition. A sampler that evaluates the
  model again at the same sigma (Heun's corrector evaluates at sigma_{i+1}, where the next step starts)
  does not advance the counter: the evaluation repeats the step's decision (a full one refreshes the
  cache, a cached one reuses it).
- **Per-run lifetime.** `reset()` at the start and end of every sampling run (also after an
  interruption), so nothing stale survives; a deep copy (ComfyUI's `ModelPatcher.clone()`) starts empty.
- **Statistics**: steps, model calls, blocks run, model time and the measured speedup, for the log line.
"""
from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass
from typing import Hashable, Optional

from skipdit_core.models import StackCut, UStack
from skipdit_core.skip_cache import SkipCacheConfig, SkipCacheRun

STATE_KEY = "skipdit_skip_cache"  # where the state lives in model_options["transformer_options"]


@dataclass(frozen=True)
class CacheTarget:
    """What is cached: the family (for the authors' settings and the log), its U-stack and how many
    blocks one unit of the stack is (2 for Latte's (spatial, temporal) pairs)."""

    family: str
    label: str
    stack: UStack
    blocks_per_unit: int = 1
    core_model: bool = False  # ComfyUI's own model (block patches) rather than ours (cut= argument)


class _Track:
    """One batch composition: its SkipCacheRun and timings."""

    def __init__(self, run: SkipCacheRun):
        self.run = run
        self.last_sigma: Optional[float] = None
        self.last_cached = False
        self.calls = 0
        self.full_seconds: list[float] = []
        self.cached_seconds: list[float] = []


class SkipCacheState:
    """Held in transformer_options[STATE_KEY] by Apply Skip-Cache; one sampling run at a time."""

    def __init__(self, config: SkipCacheConfig, target: CacheTarget):
        target.stack.check_depth(config.depth)
        self.config = config
        self.target = target
        self.reset()

    def reset(self) -> None:
        self.tracks: dict[Hashable, _Track] = {}
        self.current_cut: Optional[StackCut] = None
        self.calls = 0
        self.blocks_run = 0
        self.blocks_uncached = 0

    def __deepcopy__(self, memo):
        # ModelPatcher.clone() deep-copies model_options: a clone gets the same settings and no state.
        return SkipCacheState(self.config, self.target)

    # ------------------------------------------------------------------ per model call

    def begin(self, key: Hashable, sigma: float, timestep: float) -> Optional[StackCut]:
        """Before a model call on batch composition `key` at noise level `sigma` (timestep 0..1000):
        the cut to run with (None: uncut). Also stored as `current_cut` for block patches."""
        track = self.tracks.get(key)
        if track is None:
            track = self.tracks[key] = _Track(SkipCacheRun(
                self.config, self.target.stack, self.target.blocks_per_unit, self.target.family))
        if track.last_sigma is None or sigma != track.last_sigma:
            cut = track.run.begin_step(timestep)
            track.last_sigma = sigma
            track.last_cached = cut is not None and cut.cached is not None
        else:
            cut = self._repeat(track)
        track.calls += 1
        self.calls += 1
        stack, per_unit = self.target.stack, self.target.blocks_per_unit
        self.blocks_run += len(stack.units_run(cut)) * per_unit
        self.blocks_uncached += stack.num_units * per_unit
        self.current_cut = cut
        return cut

    def _repeat(self, track: _Track) -> Optional[StackCut]:
        """Another evaluation of the step just decided: the same decision, on the current cache."""
        if self.config.interval == 1:
            return None
        if track.last_cached and track.run.current is not None:
            return StackCut(self.config.depth, cached=track.run.current)  # the step's own (forecast) state
        return StackCut(self.config.depth)  # full: captures, refreshing the cache

    def end(self, key: Hashable, cut: Optional[StackCut], seconds: float) -> None:
        """After a successful model call: the rule's end of step (keep / drop the deep state), timing."""
        self.current_cut = None
        track = self.tracks[key]
        track.run.end_step(cut)
        (track.cached_seconds if cut is not None and cut.cached is not None else track.full_seconds).append(seconds)

    def abort(self) -> None:
        """A model call raised (e.g. an interruption): forget the cut of the unfinished call."""
        self.current_cut = None

    # ------------------------------------------------------------------ statistics

    @property
    def steps(self):
        """The step statistics (SkipCacheStats) of the first composition, or None before any call."""
        if not self.tracks:
            return None
        return next(iter(self.tracks.values())).run.stats

    def model_seconds(self) -> float:
        return sum(sum(t.full_seconds) + sum(t.cached_seconds) for t in self.tracks.values())

    def measured_speedup(self) -> Optional[float]:
        """Estimated uncached model time / estimated model time, from the measured median time of a full
        and of a cached call per batch composition (medians, so a slow first call or a stall of the
        machine does not decide the figure); None when a composition has no full call yet."""
        uncached, cached = 0.0, 0.0
        for t in self.tracks.values():
            if not t.full_seconds:
                return None
            full = statistics.median(t.full_seconds)
            part = statistics.median(t.cached_seconds) if t.cached_seconds else 0.0
            uncached += (len(t.full_seconds) + len(t.cached_seconds)) * full
            cached += len(t.full_seconds) * full + len(t.cached_seconds) * part
        return uncached / cached if cached > 0 else None

    def describe_settings(self) -> str:
        c = self.config
        forecast = f", forecast order {c.forecast}" if c.forecast else ""  # none: the paper's reuse
        return f"n={c.interval}, window t {c.start:g} -> {c.end:g}, depth k={c.depth}{forecast}"

    def summary(self, interrupted: bool = False) -> tuple[int, str]:
        """(logging level, message) for the end of a run."""
        head = f"Skip-Cache [{self.target.label}, {self.describe_settings()}]"
        stats = self.steps
        if stats is None:
            return logging.INFO, f"{head}: {'stopped before' if interrupted else 'no'} model call"
        speedup = self.measured_speedup()
        bound = stats.speedup_bound(self.config.depth, self.target.stack.num_units)
        msg = (
            f"{head}: {'interrupted after ' if interrupted else ''}{stats.full_steps} full + {stats.cached_steps} cached"
            f" of {stats.steps} steps ({self.calls} model calls, {len(self.tracks)} batch composition"
            f"{'s' if len(self.tracks) != 1 else ''}); {self.blocks_run} of {self.blocks_uncached} blocks run;"
            f" model time {self.model_seconds():.2f} s, measured speedup "
            + (f"{speedup:.2f}x" if speedup is not None else "n/a")
            + f" (bound {bound:.2f}x)"
        )
        if self.config.interval == 1:
            return logging.INFO, msg + "; interval n=1 caches nothing (identical to the uncached model)"
        if stats.cached_steps == 0 and not interrupted:
            return logging.WARNING, (
                msg + "; WARNING: no step was cached. Caching needs more than n steps below the window's start"
                f" (t < {self.config.start:g}) and above its end; check start/end against this sampler's schedule"
            )
        return logging.INFO, msg
