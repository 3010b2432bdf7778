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
- **Per-run lifetime, whatever clone() copies.** Apply Skip-Cache stores only the settings
  (`SkipCacheSetup`, immutable) in the model's transformer_options. Every sampling run gets its own
  `SkipCacheState` (`SkipCacheSetup.new_run()`, from the OUTER_SAMPLE wrapper, in that run's copy of
  transformer_options, `RUN_KEY`), dropped with the run. So two clones, two runs or a run after an
  interruption never meet, whether `ModelPatcher.clone()` deep-copies transformer_options (ComfyUI
  0.3.64) or copies only its dicts and lists and shares every other object (0.38,
  `comfy.utils.deepcopy_list_dict`).
- **Threads and devices.** ComfyUI 0.38's MultiGPU CFG Split evaluates the conds of one step in one
  worker thread per device at the same time, all in the same run. The cut of a model call is kept per
  thread (`current_cut`, read by our models and by the block patches of core Hunyuan-DiT in the
  thread that runs the call); the device is part of the batch-composition key, so each device keeps
  its own cached tensors; the shared bookkeeping is locked. The timestep rule makes the same decision
  for every composition, so every device decides alike; the statistics merge into one log line.
- **Statistics**: steps, model calls, blocks run, model time and the measured speedup, for the log line.
"""
from __future__ import annotations

import logging
import statistics
import threading
from dataclasses import dataclass
from typing import Hashable, Optional, Sequence

from skipdit_core.models import StackCut, UStack
from skipdit_core.skip_cache import SkipCacheConfig, SkipCacheRun

STATE_KEY = "skipdit_skip_cache"  # the settings (SkipCacheSetup) in model_options["transformer_options"]
RUN_KEY = "skipdit_skip_cache_run"  # the running SkipCacheState, in a sampling run's transformer_options

# The Skip-Cache state whose model call is running in this thread (set by begin, cleared by end/abort).
_ACTIVE = threading.local()


def current_cut(setup: Optional["SkipCacheSetup"]) -> Optional[StackCut]:
    """The cut of the model call this thread is running for a run of `setup` (None: no such call, or
    an uncut one). What our models' forward and core Hunyuan-DiT's block patches read."""
    state = getattr(_ACTIVE, "state", None)
    return _ACTIVE.cut if state is not None and setup is not None and state.setup is setup else None


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
        self.calls = 0
        self.seconds: dict[str, list[float]] = {"full": [], "cached": [], "empty": []}  # per kind of call


class SkipCacheSetup:
    """What Apply Skip-Cache stores in the patched model's transformer_options[STATE_KEY]: the
    settings, immutable, so sharing it between clones is harmless (a deep copy returns it as is)."""

    def __init__(self, config: SkipCacheConfig, target: CacheTarget, preset: Optional[str] = None):
        target.stack.check_depth(config.depth)
        self.config = config
        self.target = target
        self.preset = preset  # the preset's name when the settings are one (said in the log line)

    def __deepcopy__(self, memo):
        return self

    def new_run(self) -> "SkipCacheState":
        return SkipCacheState(self)

    def describe_settings(self) -> str:
        c = self.config
        damping = f" damped {c.forecast_damping:g}" if c.forecast and c.forecast_damping != 1.0 else ""
        forecast = f", forecast order {c.forecast}{damping}" if c.forecast else ""  # none: the paper's reuse
        empty = f", {c.empty_steps} of every {c.interval - 1} cached steps empty" if c.empty_steps else ""
        warmup = ", forecast warm-up" if c.forecast_warmup else ""
        residual = ", middle's residual reused" if c.reuse == "residual" else ""
        preset = f"preset {self.preset}: " if self.preset else ""
        return (f"{preset}n={c.interval}, window t {c.start:g} -> {c.end:g}, depth k={c.depth}{residual}{forecast}"
                f"{empty}{warmup}")


class SkipCacheState:
    """The state of one sampling run (transformer_options[RUN_KEY] of that run); safe to drive from
    several threads at once (one per device)."""

    def __init__(self, setup: SkipCacheSetup):
        self.setup = setup
        self.config = setup.config
        self.target = setup.target
        self._lock = threading.Lock()
        self.tracks: dict[Hashable, _Track] = {}
        self.calls = 0
        self.blocks_run = 0
        self.blocks_uncached = 0

    @property
    def current_cut(self) -> Optional[StackCut]:
        """The cut of this run's model call running in this thread (None: none, or uncut)."""
        return _ACTIVE.cut if getattr(_ACTIVE, "state", None) is self else None

    # ------------------------------------------------------------------ per model call

    def begin(self, key: Hashable, sigma: float, timestep: float) -> Optional[StackCut]:
        """Before a model call on batch composition `key` (which names the device) at noise level
        `sigma` (timestep 0..1000): the cut to run with (None: uncut), also this thread's
        `current_cut` until `end` / `abort`."""
        with self._lock:
            track = self.tracks.get(key)
            if track is None:
                track = self.tracks[key] = _Track(SkipCacheRun(
                    self.config, self.target.stack, self.target.blocks_per_unit, self.target.family))
            self.calls += 1
            stack, per_unit = self.target.stack, self.target.blocks_per_unit
            self.blocks_uncached += stack.num_units * per_unit
        # A track is one composition on one device: only this thread drives it.
        if track.last_sigma is None or sigma != track.last_sigma:
            cut = track.run.begin_step(timestep)
            track.last_sigma = sigma
        else:
            cut = track.run.repeat_step()  # another evaluation of this step: the same decision, the same state
        track.calls += 1
        with self._lock:
            self.blocks_run += len(stack.units_run(cut)) * per_unit
        _ACTIVE.state, _ACTIVE.cut = self, cut
        return cut

    def end(self, key: Hashable, cut: Optional[StackCut], seconds: float) -> None:
        """After a successful model call: the rule's end of step (keep / drop the deep state), timing."""
        _ACTIVE.state = _ACTIVE.cut = None
        with self._lock:
            track = self.tracks[key]
        track.run.end_step(cut)
        track.seconds["full" if cut is None else cut.kind].append(seconds)

    def abort(self) -> None:
        """A model call raised (e.g. an interruption): forget the cut of the unfinished call."""
        _ACTIVE.state = _ACTIVE.cut = None

    # ------------------------------------------------------------------ statistics

    @property
    def steps(self):
        """The step statistics (SkipCacheStats) of the first composition, or None before any call."""
        if not self.tracks:
            return None
        return next(iter(self.tracks.values())).run.stats

    def model_seconds(self) -> float:
        return sum(sum(sum(s) for s in t.seconds.values()) for t in self.tracks.values())

    def measured_speedup(self) -> Optional[float]:
        """Estimated uncached model time / estimated model time, from the measured median time of a full,
        a cached and an empty call per batch composition (medians, so a slow first call or a stall of the
        machine does not decide the figure); None when a composition has no full call yet."""
        uncached, cached = 0.0, 0.0
        for t in self.tracks.values():
            if not t.seconds["full"]:
                return None
            full = statistics.median(t.seconds["full"])
            calls = sum(len(s) for s in t.seconds.values())
            uncached += calls * full
            cached += sum(len(s) * statistics.median(s) for s in t.seconds.values() if s)
        return uncached / cached if cached > 0 else None

    def describe_settings(self) -> str:
        return self.setup.describe_settings()

    def summary(self, outcome: str = "finished", others: Sequence[str] = ()) -> tuple[int, str]:
        """(logging level, message) for the end of a run: outcome "finished", "interrupted" (the user
        stopped it) or "failed" (an error); `others`: other caches on the same model, named so that
        figures measured with both are not read as Skip-Cache's alone."""
        head = f"Skip-Cache [{self.target.label}, {self.describe_settings()}]"
        if others:
            head += f" (together with {', '.join(others)}: the figures below are of both)"
        stats = self.steps
        interrupted = outcome != "finished"
        if stats is None:
            return logging.INFO, f"{head}: {outcome + ' before a' if interrupted else 'no'} model call"
        speedup = self.measured_speedup()
        bound = stats.speedup_bound(self.config.depth, self.target.stack.num_units)
        msg = (
            f"{head}: {outcome + ' after ' if interrupted else ''}{stats.full_steps} full + {stats.cached_steps} cached"
            + (f" ({stats.empty_steps} of them empty)" if stats.empty_steps else "")
            + f" of {stats.steps} steps ({self.calls} model calls, {len(self.tracks)} batch composition"
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
