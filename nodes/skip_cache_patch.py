"""Apply Skip-Cache: MODEL -> MODEL, on the pack's models and on ComfyUI's own Hunyuan-DiT and Wan 2.1 / 2.2.

Built on `ModelPatcher.clone()` and ComfyUI's extension points only:
- an OUTER_SAMPLE wrapper gives each sampling run its own state (`SkipCacheSetup.new_run()`, in the run's
  copy of transformer_options) and, in a `finally`, logs the cached / full steps with the measured
  speedup, naming any other cache on the model, and tells a finished, an interrupted and a failed run apart;
- an APPLY_MODEL wrapper decides every model call (`SkipCacheState.begin`, i.e. skipdit_core's
  `SkipCacheRun` per batch composition, the step identified by its sigma) and times it;
- our models read the cut of the current call from transformer_options and pass it as `cut=`;
- ComfyUI's HunYuanDiT and WanModel get `double_block` replace patches (`set_model_patch_replace`): on a
  cached step blocks [k, L-k) are bypassed and block L-k-1 hands on the deep state of the last full step
  (with `reuse` "residual": its own input plus the middle's residual of the last full step; on Wan, which has
  no long skips, that is the only way the fresh work of blocks [0, k) reaches the output). Hunyuan-DiT's skip
  push / pop stays outside the patches: bypassed shallow blocks push their input, bypassed deep blocks pop
  those same entries, so deep blocks L-k..L-1 still receive the fresh outputs of blocks k-1..0. With empty
  steps every block is patched: on an empty step all are bypassed and the last one hands on the forecast output.
The settings live in the clone's transformer_options: the input model is untouched, and removing the node
removes the effect.
"""
from __future__ import annotations

import logging
import time

import torch

import comfy.model_management
import comfy.patcher_extension
from comfy.ldm.hydit.models import HunYuanDiT
from comfy.ldm.wan.model import WanModel
from comfy_api.latest import io

from skipdit_core.skip_cache import REUSE_KINDS
from skipdit_core.skip_cache_presets import PRESET_SPEEDS, preset_config

from . import adapters
from .branch_patch import BRANCHES_KEY
from .cache_state import RUN_KEY, STATE_KEY, CacheTarget, SkipCacheSetup, current_cut
from .comfy_model import SkipDiTModel

WRAPPER_KEY = "skipdit_skip_cache"
WRAPPERS = comfy.patcher_extension.WrappersMP


def cache_target(model) -> CacheTarget:
    """What Apply Skip-Cache can cut in this MODEL, or a clear error."""
    base = model.model
    dm = getattr(base, "diffusion_model", None)
    if isinstance(base, SkipDiTModel):
        return CacheTarget(base.family, adapters.FAMILY_LABELS[base.family], dm.stack, getattr(dm, "blocks_per_unit", 1))
    if isinstance(dm, HunYuanDiT):
        return CacheTarget("hunyuan", "Hunyuan-DiT (ComfyUI)", adapters.core_hunyuan_stack(dm.depth), 1, core_model=True)
    if isinstance(dm, WanModel):
        if type(dm) is not WanModel:  # VACE, camera, S2V, ...: their own block loops add to the blocks' outputs
            raise ValueError(
                f"Apply Skip-Cache: the Wan variant {type(dm).__name__} is not supported (its block loop adds its own "
                "inputs between blocks); it works on plain Wan 2.1 / 2.2 models (text-to-video, image-to-video, TI2V 5B)"
            )
        branches = model.model_options.get("transformer_options", {}).get(BRANCHES_KEY)
        if branches is not None:  # Load Skip Branches: a Skip-Wan, cut across its long skips
            return CacheTarget("wan", "Skip-Wan (ComfyUI + skip branches)", branches.stack, 1, core_model=True)
        return CacheTarget("wan", "Wan (ComfyUI)", adapters.core_wan_stack(len(dm.blocks)), 1, core_model=True)
    raise ValueError(
        f"Apply Skip-Cache: {type(base).__name__} is not a model it can cut. It works on the models of Load Skip-DiT "
        "Model and on ComfyUI's own Hunyuan-DiT and Wan 2.1 / 2.2"
    )


# ----------------------------------------------------------------------------- wrappers


def outer_sample_wrapper(executor, *args, **kwargs):
    """Around a whole sampling run (CFGGuider.outer_sample): this run's own state, then the log line.

    The state goes into the guider's model_options, which CFGGuider.sample made a per-run copy of
    (`create_model_options_clone`, nested dicts copied); it is taken out again after the run, so the
    cached tensors go with it."""
    guider = executor.class_obj
    options = guider.model_options.get("transformer_options", {})
    setup = options.get(STATE_KEY)
    if setup is None:
        return executor(*args, **kwargs)
    state = setup.new_run()
    previous = options.get(RUN_KEY)
    options[RUN_KEY] = state
    outcome = "failed"
    try:
        out = executor(*args, **kwargs)
        outcome = "finished"
        return out
    except comfy.model_management.InterruptProcessingException:
        outcome = "interrupted"
        raise
    finally:
        if previous is None:
            options.pop(RUN_KEY, None)
        else:
            options[RUN_KEY] = previous
        level, message = state.summary(outcome=outcome, others=other_caches(guider.model_options))
        logging.log(level, message)


# Wrapper kinds through which other caches act (core EasyCache: DIFFUSION_MODEL, LazyCache: PREDICT_NOISE).
_CACHE_WRAPPER_KINDS = (WRAPPERS.DIFFUSION_MODEL, WRAPPERS.PREDICT_NOISE, WRAPPERS.APPLY_MODEL, WRAPPERS.CALC_COND_BATCH)


def other_caches(model_options: dict) -> list[str]:
    """The keys of other nodes' wrappers that can skip model work (e.g. "easycache", "lazycache")."""
    wrappers = model_options.get("transformer_options", {}).get("wrappers", {})
    found = {key for kind in _CACHE_WRAPPER_KINDS for key, fns in wrappers.get(kind, {}).items() if fns and key != WRAPPER_KEY}
    return sorted(found)


def apply_model_wrapper(executor, *args, **kwargs):
    """Around BaseModel._apply_model(x, sigma, c_concat, c_crossattn, control, transformer_options, ...)."""
    x, sigma = args[0], args[1]
    options = args[5] if len(args) > 5 else kwargs.get("transformer_options", {})
    state = options.get(RUN_KEY) if isinstance(options, dict) else None
    if state is None:  # a call outside a sampling run of this model
        return executor(*args, **kwargs)
    base = executor.class_obj
    timestep = float(base.model_sampling.timestep(sigma.reshape(-1)[:1]).float()[0])
    # one track per batch composition per device: each device keeps its own cached tensors
    key = (tuple(options.get("uuids") or ()), tuple(options.get("cond_or_uncond") or ()), tuple(x.shape), str(x.device))
    cut = state.begin(key, float(sigma.reshape(-1)[0]), timestep)
    start = time.perf_counter()
    try:
        out = executor(*args, **kwargs)
        if out.device.type == "cuda":
            torch.cuda.synchronize(out.device)
    except BaseException:
        state.abort()
        raise
    state.end(key, cut, time.perf_counter() - start)
    return out


class CoreBlockPatch:
    """A `double_block` replace patch of a ComfyUI core model's block `index` (in [k, L-k), or every block
    when steps may be empty).

    It holds the settings only; the cut it follows is that of the model call running in its thread
    (`current_cut`), so a patch shared between clones or driven by several device threads at once
    stays right. `inner` is a patch another node had set on this block, called instead of the
    original block (patches coexist). With a residual cut, the full step's block k remembers its input
    h_k on the cut and block L-k-1 captures its output minus it; a cached step's block L-k-1 returns its
    own input (the fresh h_k, passed through the bypassed blocks) plus the cached residual."""

    def __init__(self, setup: SkipCacheSetup, index: int, inner=None):
        self.setup = setup
        self.index = index
        self.inner = inner

    def _run(self, args, extra):
        return self.inner(args, extra) if self.inner is not None else extra["original_block"](args)

    def __call__(self, args, extra):
        cut = current_cut(self.setup)
        if cut is None:
            return self._run(args, extra)
        L = self.setup.target.stack.num_units
        deep = L - cut.depth - 1  # block L-k-1: its output is the deep state
        if cut.kind == "empty":
            return {"img": cut.output if self.index == L - 1 else args["img"]}
        if cut.kind == "cached":
            if not cut.depth <= self.index < L - cut.depth:
                return self._run(args, extra)
            return {"img": cut.resume(args["img"]) if self.index == deep else args["img"]}
        if self.index == cut.depth:
            cut.enter_middle(args["img"])
        out = self._run(args, extra)
        if self.index == deep:
            cut.capture(out["img"])
        if self.index == L - 1:
            cut.captured_output = out["img"]
        return out


def _without_our_patches(model) -> None:
    """Remove patches of an earlier Apply Skip-Cache on this (cloned) model; keep other nodes' patches."""
    options = model.model_options["transformer_options"]
    replace = options.get("patches_replace", {}).get("dit")
    if not replace:
        return
    options["patches_replace"] = dict(options["patches_replace"])
    kept = {}
    for key, patch in replace.items():
        while isinstance(patch, CoreBlockPatch):
            patch = patch.inner
        if patch is not None:
            kept[key] = patch
    options["patches_replace"]["dit"] = kept


# ----------------------------------------------------------------------------- the node


class ApplySkipCache(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SkipDiTApplySkipCache",
            display_name="Apply Skip-Cache",
            category="Skip-DiT",
            description=(
                "Skip-Cache (Skip-DiT): on cached steps only the first and last k blocks of the model run, fed the "
                "deep features of the last full step (on a model without long skips, such as Wan, the last k blocks "
                "alone resume from them; with reuse = residual, from their own features plus the change the middle "
                "blocks made at the last full step). Works on the models of Load Skip-DiT Model and on ComfyUI's "
                "Hunyuan-DiT and Wan 2.1 / 2.2. Logs the cached / full steps and the measured speedup after each run."
            ),
            inputs=[
                io.Model.Input("model", tooltip="A model of Load Skip-DiT Model, or ComfyUI's Hunyuan-DiT or Wan 2.1 / 2.2."),
                io.Int.Input(
                    "interval", default=2, min=1, max=64,
                    tooltip="n: one full step every n steps inside the window; the others are cached. 1 = off "
                    "(identical to the uncached model).",
                ),
                io.Combo.Input(
                    "settings", options=["auto", "custom"], default="auto",
                    tooltip="auto: the authors' window and depth for the model's family (Latte 900->50 k=1, Latte "
                    "T2V 700->50 k=1, DiT 1000->20 k=4 (at most the model's skips), Hunyuan-DiT 700->50 k=1, Wan 1000->0 k=1); start / end / depth below are "
                    "then ignored. custom: use them.",
                ),
                io.Combo.Input(
                    "window_unit", options=list(adapters.WINDOW_UNITS), default="timesteps",
                    tooltip="custom window in training timesteps (1000 = pure noise, 0 = clean, like the paper) or "
                    "in percent of sampling progress (0 = start, 100 = end).",
                ),
                io.Float.Input(
                    "start", default=700.0, min=0.0, max=1000.0, step=1.0,
                    tooltip="Steps at or above this timestep (or before this percent) are always full.",
                ),
                io.Float.Input(
                    "end", default=50.0, min=0.0, max=1000.0, step=1.0,
                    tooltip="After a step at or below this timestep (or past this percent) the cache is dropped: "
                    "the last steps run in full.",
                ),
                io.Int.Input(
                    "depth", default=1, min=1, max=64,
                    tooltip="k: units recomputed at each end on cached steps (blocks; (spatial, temporal) block "
                    "pairs for Latte). At most the model's number of long skips.",
                ),
                io.Int.Input(
                    "forecast", default=0, min=0, max=2, optional=True,
                    tooltip="What cached steps are fed. 0: the deep features of the last full step, as the paper. "
                    "1 / 2: those features forecast to the step's timestep from the last 2 / 3 full steps (a line / "
                    "a parabola in t): closer to the uncached output in wide windows at the same speed; keeps 2 / 3 "
                    "copies of the deep features.",
                ),
                io.Float.Input(
                    "forecast_damping", default=1.0, min=0.0, max=1.0, step=0.05, optional=True,
                    tooltip="With a forecast: the fraction of its change from the last full step's features that is "
                    "applied (1 = the whole forecast, 0 = none, i.e. the paper's reuse). interval 3 over the whole "
                    "schedule with forecast 1 at 0.7 ran about 2x and stayed closer to the uncached output than "
                    "interval 2, 700 -> 50 (about 1.4x) in our measurements.",
                ),
                io.Int.Input(
                    "empty_steps", default=0, min=0, max=63, optional=True,
                    tooltip="Of the interval - 1 cached steps of each interval, how many run no block at all: the "
                    "model's output features are forecast from the last full steps (with forecast 0: reused). Costs "
                    "nothing per step, so at the same speed more steps can be full. Must be below the interval.",
                ),
                io.Boolean.Input(
                    "forecast_warmup", default=False, optional=True,
                    tooltip="Run in full the steps that would be cached before the forecast has its order + 1 full "
                    "steps (at the start of sampling), so no cached step extrapolates from fewer points.",
                ),
                io.Combo.Input(
                    "reuse", options=list(REUSE_KINDS), default="state", optional=True,
                    tooltip="What cached steps take from the full steps. state: the deep features themselves (the "
                    "paper). residual: the change the middle blocks made, added to the cached step's own features "
                    "after its first k blocks (what First Block Cache reuses). On a model without long skips the state "
                    "was the closer of the two (docs/benchmarks.md, section 9).",
                ),
                io.Combo.Input(
                    "preset", options=["off", *PRESET_SPEEDS], default="off", optional=True,
                    tooltip="A setting named by the speed it targets, chosen on tuning seeds and checked on seeds no "
                    "choice used (docs/presets.md), for Latte Skip-DiT models and for Wan. When not off it replaces "
                    "every input above. off: the inputs above.",
                ),
            ],
            outputs=[io.Model.Output(tooltip="The model with Skip-Cache; the input model is unchanged.")],
        )

    @classmethod
    def execute(cls, model, interval, settings, window_unit, start, end, depth, forecast=0, forecast_damping=1.0,
                empty_steps=0, forecast_warmup=False, reuse="state", preset="off") -> io.NodeOutput:
        target = cache_target(model)
        if preset != "off":
            config = preset_config(target.family, target.stack.num_skips > 0, preset)
        else:
            config = adapters.cache_config(
                target.family, interval, settings, window_unit, start, end, depth, max_depth=target.stack.max_depth,
                forecast=forecast, forecast_damping=forecast_damping, empty_steps=empty_steps,
                forecast_warmup=forecast_warmup, reuse=reuse,
            )
        setup = SkipCacheSetup(config, target, preset if preset != "off" else None)  # checks k against the long skips
        patched = model.clone()
        patched.model_options["transformer_options"][STATE_KEY] = setup
        for kind, wrapper in ((WRAPPERS.OUTER_SAMPLE, outer_sample_wrapper), (WRAPPERS.APPLY_MODEL, apply_model_wrapper)):
            patched.remove_wrappers_with_key(kind, WRAPPER_KEY)  # applying the node twice: the last one wins
            patched.add_wrapper_with_key(kind, WRAPPER_KEY, wrapper)
        if target.core_model:
            _without_our_patches(patched)
            existing = patched.model_options["transformer_options"].get("patches_replace", {}).get("dit", {})
            L, k = target.stack.num_units, config.depth
            for i in range(0, L) if config.empty_steps else range(k, L - k):
                inner = existing.get(("double_block", i))
                patched.set_model_patch_replace(CoreBlockPatch(setup, i, inner), "dit", "double_block", i)
        logging.info(f"Skip-Cache set up on {target.label}: {setup.describe_settings()}")
        return io.NodeOutput(patched)
