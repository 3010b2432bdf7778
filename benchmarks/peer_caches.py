"""The peer caching methods the benchmark compares Skip-Cache with, applied to our (vanilla) Latte.

    with peer_cache(model, "pab", spatial_skip=3) as stats:
        result = pipeline.generate(model, req)      # unchanged: one batched cond + uncond call per step
    print(stats.compute_fraction, result.seconds)

Five run through diffusers' own hooks (`diffusers.hooks`, tested with diffusers 0.42), the sixth through
cache-dit's own `enable_cache`; none is a re-implementation. Our model is not a diffusers model, so a thin
adapter presents it the way each method expects, only for the duration of the context and only on this
model instance (no class of ours is patched, nothing in `skipdit_core` changes):

| method        | diffusers hook                       | what the adapter does                                     |
|---------------|--------------------------------------|-----------------------------------------------------------|
| "fbcache"     | `apply_first_block_cache`            | the hook's "blocks" are our stack units, the (spatial, temporal) block PAIRS, each a `_PairUnit` registered in diffusers' `TransformerBlockRegistry`; `model.stack` is replaced by a view that runs every unit through its `_PairUnit` |
| "pab"         | `apply_pyramid_attention_broadcast`  | each `blocks.N.attn` is wrapped in `_AttentionAdapter` (a diffusers `AttentionModuleMixin`); even N are spatial, odd N temporal attention |
| "fastercache" | `apply_faster_cache`                 | attention wrapped as for PAB; the denoiser-level hook (CFG-Cache) sits on the model itself, behind `_UncondFirstHook`, which presents our [cond, uncond] batch in the [uncond, cond] order the hook assumes and swaps the output back |
| "taylorseer"  | `apply_taylorseer_cache`             | each `blocks.N.attn` and `blocks.N.mlp` is wrapped (`_AttentionAdapter`, `_Adapter`) and predicted by Taylor expansion (TaylorSeer's DiT code predicts both; diffusers' default hooks attention only) |
| "magcache"    | `apply_mag_cache`                    | as FBCache: the hook's blocks are the stack units (`_PairUnit`); its magnitude ratios come from diffusers' own calibration mode (`magcache_ratios`) |
| "cachedit"    | cache-dit's `enable_cache` (DBCache, optional TaylorSeer calibrator; `pip install cache-dit`, tested with 1.5.3) | cache-dit's transformer-only path: a `BlockAdapter` over `_PairUnits` (FBCache's holder of the `_PairUnit`s), whose forward loops over them (cache-dit swaps that list for its cached blocks during the forward); `model.stack` runs the whole stack through it |

Why pairs for FBCache: applied to the 2L raw blocks, the hook's tail residual would be "last temporal
block output minus first spatial block output", two tensors in different layouts ((B*T, F, D) vs
(B*F, T, D)), and the temporal embedding added after block 0 would sit inside the cached span. A pair
starts and ends in the spatial layout, so head and tail residuals live in one layout; the head unit
(always computed) is the first pair, 2 of the 2L blocks.

Common to all methods:
- the current timestep comes from a forward pre-hook on the model (the hooks' `current_timestep_callback`);
- a model call whose timestep is not below the previous call's starts a new trajectory: every hook's
  state is reset (`HookRegistry.reset_stateful_hooks`), so any number of `generate()` runs can share
  one context; `PeerStats` accumulates over them (`runs` counts them);
- state is kept per batched call (the CFG halves are one call, one diffusers cache context "batch");
- the hooks are never attached to our own Attention / Mlp modules, only to adapters, so a forward
  pre-hook on our modules counts exactly the calls that really ran (`PeerStats`);
- on exit the model is restored exactly: adapters swapped back, hooks removed, the attributes diffusers
  adds (`forward`, `_diffusers_hook`) deleted.

Knobs (defaults in `METHODS`, for a 50-step DDIM run with guidance; timesteps are original 0..999):
- fbcache: `threshold` — skip pairs 1..L-1 when the first pair's residual changed by less than this
  (relative mean abs); 0 = never skip.
- pab: `spatial_skip`, `temporal_skip` — compute each attention every N-th step inside `window`
  (exclusive timestep bounds), broadcast the last output otherwise; 1 = never skip. Defaults 2 / 3
  in (100, 800): diffusers' default window, temporal broadcast longer than spatial as in PAB.
- fastercache: `uncond_skip` — compute the unconditional half only every N-th step inside
  `uncond_window` and approximate it in frequency space from the conditional half (CFG-Cache);
  `attention_skip` — on those half-batch steps, attention is computed every N-th step inside
  `attention_window` and extrapolated otherwise (our choice: spatial and temporal alike, where
  diffusers' default leaves temporal attention alone; weight 0.5, diffusers' default; the other
  windows and the frequency weights are diffusers' defaults). uncond_skip=1 = never skip. Needs the
  guided batch of a class-conditional model (a ValueError otherwise).
- taylorseer: `interval` — full compute every N steps after `warmup` full steps, attention / MLP
  outputs predicted by an order-`order` Taylor expansion in between (factors kept in float32);
  1 = never skip.
- cachedit: DBCache. `Fn` / `Bn` — the first / last units always computed; `threshold` — the middle
  units are skipped (their last residual reused) when the first `Fn` units' residual changed by less
  than this (relative L1); `warmup` — full steps first (cache-dit's `max_warmup_steps`, default 8);
  `taylorseer_order` — 0: plain reuse, 1-2: cache-dit's TaylorSeer calibrator forecasts the reused
  residual. One cache-dit context per setting, refreshed at every new trajectory; cond and uncond are
  one batched call (`enable_separate_cfg=False`). threshold=0 = never skip.
- magcache: `threshold` — skip every unit (the output is the input plus the last residual) while the
  error accumulated from the calibrated magnitude ratios stays below it, at most `max_skip_steps` in a
  row, never in the first `retention_ratio` of the `num_inference_steps` steps (diffusers' defaults);
  `mag_ratios`: the model's ratios per step, from `magcache_ratios(model, request)` (diffusers'
  calibration run); max_skip_steps=0 = never skip.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from skipdit_core.diffusion import CFG_CONVENTIONS
from skipdit_core.models.layers import Attention, DiTBlock, Mlp

METHODS: dict[str, dict[str, Any]] = {
    "fbcache": {"threshold": 0.05},
    "pab": {"spatial_skip": 2, "temporal_skip": 3, "window": (100, 800)},
    "fastercache": {"uncond_skip": 5, "attention_skip": 2, "uncond_window": (-1, 641), "attention_window": (-1, 681)},
    "taylorseer": {"interval": 4, "order": 2, "warmup": 3},
    "magcache": {"threshold": 0.06, "max_skip_steps": 3, "retention_ratio": 0.2, "num_inference_steps": 50,
                 "mag_ratios": None},
    "cachedit": {"Fn": 1, "Bn": 0, "threshold": 0.08, "warmup": 8, "taylorseer_order": 0},
}

# Module names of the attention layers as the hooks see them (`blocks.N.attn`, N even: spatial).
_SPATIAL_ATTN = r"^blocks\.\d*[02468]\.attn$"
_TEMPORAL_ATTN = r"^blocks\.\d*[13579]\.attn$"
_CONTEXT = "batch"  # one diffusers cache context: cond and uncond run as one batched call


@dataclass
class PeerStats:
    """What a context computed, next to what the uncached runs of the same calls would have.

    Calls count executions of our attention / MLP modules (a half-batch call of FasterCache counts
    as one); MACs are the multiply-adds of those calls (qkv, proj, the two attention matmuls, fc1,
    fc2), so a half-batch call counts half. `compute_fraction` = macs / macs_total is the
    benchmark's compute fraction (embedders, adaLN and the final layer are left out of both).
    """

    method: str
    params: dict
    runs: int = 0  # trajectories (a call whose timestep does not decrease starts a new one)
    forwards: int = 0  # model calls, one per denoising step
    attn_calls: int = 0
    attn_calls_total: int = 0
    mlp_calls: int = 0
    mlp_calls_total: int = 0
    macs: int = 0
    macs_total: int = 0

    @property
    def compute_fraction(self) -> float:
        return self.macs / self.macs_total if self.macs_total else 1.0

    @property
    def attn_skipped(self) -> int:
        return self.attn_calls_total - self.attn_calls

    @property
    def mlp_skipped(self) -> int:
        return self.mlp_calls_total - self.mlp_calls


def _attn_macs(n: int, t: int, d: int) -> int:
    """Self-attention over (n, t, d): qkv + proj projections, QK^T and AV."""
    return n * t * 4 * d * d + 2 * n * t * t * d


def _mlp_macs(rows: int, d: int, hidden: int) -> int:
    return 2 * rows * d * hidden


# ------------------------------------------------------------------------------------------- adapters


def _diffusers_attention_mixin() -> type:
    from diffusers.models.attention import AttentionModuleMixin

    return AttentionModuleMixin


class _Adapter(nn.Module):
    """Stands in for one of our modules so that diffusers' hooks attach here, not to it.
    forward(hidden_states) = inner(hidden_states): (N, T, D) -> (N, T, D)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.inner(hidden_states)


_attention_adapter_cls = None


def _AttentionAdapter(inner: nn.Module) -> nn.Module:
    """An `_Adapter` that diffusers recognises as a (self-)attention layer (an `AttentionModuleMixin`),
    which is what PAB and FasterCache look for. The class is made on first use (diffusers imported lazily)."""
    global _attention_adapter_cls
    if _attention_adapter_cls is None:
        _attention_adapter_cls = type(
            "_AttentionAdapter", (_diffusers_attention_mixin(), _Adapter),
            {"is_cross_attention": False, "__module__": __name__, "__doc__": _Adapter.__doc__},
        )
    return _attention_adapter_cls(inner)


class _PairUnit(nn.Module):
    """Unit i of the stack (our (spatial, temporal) block pair) as a diffusers transformer block.

    forward(hidden_states, run_unit) -> run_unit(i, hidden_states): (B*F, T, D) -> (B*F, T, D),
    the spatial layout on both sides. run_unit is the model's own pair function (blocks, rearranges,
    temporal embedding), so nothing of the computation is re-implemented here.
    """

    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def forward(self, hidden_states: torch.Tensor, run_unit: Callable) -> torch.Tensor:
        return run_unit(self.index, hidden_states)


class _PairUnits(nn.Module):
    """The `_PairUnit`s under the name diffusers' FBCache / MagCache look for (`transformer_blocks`); as a
    module, forward(hidden_states, run_unit) runs them in order, (B*F, T, D) -> (B*F, T, D): the shape
    cache-dit patches (it swaps that list for its cached blocks during the forward)."""

    def __init__(self, n: int):
        super().__init__()
        self.transformer_blocks = nn.ModuleList([_PairUnit(i) for i in range(n)])

    def forward(self, hidden_states: torch.Tensor, run_unit: Callable) -> torch.Tensor:
        for block in self.transformer_blocks:
            hidden_states = block(hidden_states, run_unit)
        return hidden_states


class _WholeStackView:
    """Replaces a vanilla `model.stack` for the context: the whole run is one `_PairUnits` call (what
    cache-dit wraps). No skip branch to fuse and no cut: that holds for the vanilla twin only."""

    def __init__(self, stack, units: _PairUnits):
        self._stack, self._units = stack, units

    def run(self, h, run_unit, fuse, cut=None):
        if cut is not None or self._stack.observers:
            raise ValueError("cachedit runs the whole vanilla stack: no stack cut, no observers")
        return self._units(h, run_unit)

    def __getattr__(self, name):
        return getattr(self._stack, name)


class _PairStackView:
    """Replaces `model.stack` for the context: the same UStack run, every unit through its `_PairUnit`."""

    def __init__(self, stack, units: nn.ModuleList):
        self._stack, self._units = stack, units

    def run(self, h, run_unit, fuse, cut=None):
        return self._stack.run(h, lambda i, z: self._units[i](z, run_unit), fuse, cut)

    def __getattr__(self, name):
        return getattr(self._stack, name)


def _swap_halves(v):
    if torch.is_tensor(v) and v.ndim and v.shape[0] % 2 == 0:
        first, second = v.chunk(2, dim=0)
        return torch.cat([second, first], dim=0)
    return v


def _uncond_first_hook():
    """A diffusers ModelHook, registered outside FasterCache's denoiser hook: that hook assumes the
    batch is [uncond, cond] (it computes the second half, approximates the first); our Latte batches
    [cond, uncond]. Inputs go in with their halves swapped, the output comes back swapped again."""
    from diffusers.hooks import ModelHook

    class _UncondFirstHook(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            return tuple(_swap_halves(a) for a in args), {k: _swap_halves(v) for k, v in kwargs.items()}

        def post_forward(self, module, output):
            return _swap_halves(output)

    return _UncondFirstHook()


# -------------------------------------------------------------------------------------------- session


class _Session:
    """Everything one context attached, and how to take it off again."""

    def __init__(self, model: nn.Module, method: str, params: dict):
        self.model = model
        self.stats = PeerStats(method, dict(params))
        self.t: float | None = None  # the current call's timestep, for the hooks' callbacks
        self.roots: list[nn.Module] = []  # modules whose diffusers hook trees hold state
        self.check_inputs: Callable | None = None
        self.on_new_run: list[Callable[[], None]] = []  # resets of state kept outside diffusers' hooks
        self._last_t: float | None = None
        self._undo: list[Callable[[], None]] = []
        self._blocks = list(model.blocks)
        self._hidden = model.config.hidden_size
        self._mlp_hidden = self._blocks[0].mlp.fc1.out_features

    def timestep(self) -> float:
        return self.t

    def swap(self, parent: Any, name: str, new: Any) -> None:
        old = getattr(parent, name)
        setattr(parent, name, new)
        self._undo.append(lambda: setattr(parent, name, old))

    def hook_root(self, module: nn.Module) -> None:
        """Remember a module whose diffusers hooks carry state; when it is the model, its hooks and
        the attributes diffusers put on it come off on exit."""
        self.roots.append(module)
        if module is self.model:
            had = {k for k in ("forward", "_diffusers_hook") if k in module.__dict__}
            self._undo.append(lambda: _remove_diffusers_hooks(module, had))

    def start(self) -> None:
        model = self.model
        self._undo.append(model.register_forward_pre_hook(self._before_forward, with_kwargs=True).remove)
        for block in self._blocks:
            self._undo.append(block.attn.register_forward_pre_hook(self._count_attn).remove)
            self._undo.append(block.mlp.register_forward_pre_hook(self._count_mlp).remove)

    def close(self) -> None:
        errors = []
        while self._undo:
            try:
                self._undo.pop()()
            except Exception as e:  # keep restoring the rest
                errors.append(e)
        if errors:
            raise errors[0]

    # ---- hooks
    def _before_forward(self, module, args, kwargs):
        x = args[0] if args else kwargs["x"]
        t = args[1] if len(args) > 1 else kwargs["t"]
        t = float(t.reshape(-1)[0])
        if self._last_t is None or t >= self._last_t:
            self._new_run()
        self._last_t = self.t = t
        if self.check_inputs is not None:
            self.check_inputs(args, kwargs)
        s = self.stats
        s.forwards += 1
        s.attn_calls_total += len(self._blocks)
        s.mlp_calls_total += len(self._blocks)
        s.macs_total += self._uncached_macs(x)

    def _uncached_macs(self, x: torch.Tensor) -> int:
        b, f, _, h, w = x.shape
        p = self.model.config.patch_size
        t, d = (h // p) * (w // p), self._hidden
        pair = _attn_macs(b * f, t, d) + _attn_macs(b * t, f, d) + 2 * _mlp_macs(b * f * t, d, self._mlp_hidden)
        return pair * (len(self._blocks) // 2)

    def _count_attn(self, module, args):
        n, t, d = args[0].shape
        self.stats.attn_calls += 1
        self.stats.macs += _attn_macs(n, t, d)

    def _count_mlp(self, module, args):
        x = args[0]
        self.stats.mlp_calls += 1
        self.stats.macs += _mlp_macs(x.numel() // x.shape[-1], x.shape[-1], module.fc1.out_features)

    def _new_run(self) -> None:
        from diffusers.hooks import HookRegistry

        self.stats.runs += 1
        for root in self.roots:
            HookRegistry.check_if_exists_or_initialize(root).reset_stateful_hooks(recurse=True)
            _set_context(root)  # a reset drops the StateManagers' context
        for reset in self.on_new_run:
            reset()


def _set_context(root: nn.Module) -> None:
    try:
        from diffusers.hooks.hooks import CacheContext, _set_cache_context
    except ImportError as e:  # pragma: no cover
        raise ImportError("benchmarks.peer_caches needs diffusers with hook cache contexts (tested with 0.42)") from e
    _set_cache_context(root, CacheContext(_CONTEXT))


def _remove_diffusers_hooks(module: nn.Module, had: set) -> None:
    registry = module.__dict__.get("_diffusers_hook")
    if registry is not None:
        for name in reversed(list(registry._hook_order)):
            registry.remove_hook(name, recurse=False)
    for attr in ("forward", "_diffusers_hook"):
        if attr not in had:
            module.__dict__.pop(attr, None)


# -------------------------------------------------------------------------------------------- methods


def _wrap_attention(s: _Session) -> None:
    for block in s._blocks:
        s.swap(block, "attn", _AttentionAdapter(block.attn))


def _apply_fbcache(s: _Session, threshold: float) -> None:
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    units = _pair_units(s, "fbcache")
    apply_first_block_cache(units, FirstBlockCacheConfig(threshold=threshold))
    s.hook_root(units)


def _apply_pab(s: _Session, spatial_skip: int, temporal_skip: int, window: tuple) -> None:
    from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

    _wrap_attention(s)
    s.hook_root(s.model)
    apply_pyramid_attention_broadcast(s.model, PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=spatial_skip,
        temporal_attention_block_skip_range=temporal_skip,
        spatial_attention_timestep_skip_range=tuple(window),
        temporal_attention_timestep_skip_range=tuple(window),
        spatial_attention_block_identifiers=(_SPATIAL_ATTN,),
        temporal_attention_block_identifiers=(_TEMPORAL_ATTN,),
        cross_attention_block_identifiers=(),
        current_timestep_callback=s.timestep,
    ))


def _apply_fastercache(s: _Session, uncond_skip: int, attention_skip: int, uncond_window: tuple,
                       attention_window: tuple) -> None:
    from diffusers.hooks import FasterCacheConfig, HookRegistry, apply_faster_cache

    model = s.model
    null = model.config.num_classes
    if null == 0:
        raise ValueError("fastercache needs classifier-free guidance: this Latte model is unconditional")

    def check_inputs(args, kwargs):
        y = kwargs.get("y", args[2] if len(args) > 2 else None)
        half = y.shape[0] // 2 if y is not None else 0
        if not half or y.shape[0] % 2 or not bool((y[half:] == null).all() if CFG_CONVENTIONS["latte"].cond_first
                                                  else (y[:half] == null).all()):
            raise ValueError("fastercache approximates the unconditional half of a guided batch: "
                             "run generate() with guidance > 1")

    s.check_inputs = check_inputs
    _wrap_attention(s)
    s.hook_root(model)
    apply_faster_cache(model, FasterCacheConfig(
        spatial_attention_block_skip_range=attention_skip,
        temporal_attention_block_skip_range=attention_skip,
        spatial_attention_timestep_skip_range=tuple(attention_window),
        temporal_attention_timestep_skip_range=tuple(attention_window),
        unconditional_batch_skip_range=uncond_skip,
        unconditional_batch_timestep_skip_range=tuple(uncond_window),
        spatial_attention_block_identifiers=(_SPATIAL_ATTN,),
        temporal_attention_block_identifiers=(_TEMPORAL_ATTN,),
        attention_weight_callback=lambda _: 0.5,
        tensor_format="BFCHW",  # our output (B, F, C, H, W)
        current_timestep_callback=s.timestep,
        _unconditional_conditional_input_kwargs_identifiers=["y"],
    ))
    if CFG_CONVENTIONS["latte"].cond_first:
        HookRegistry.check_if_exists_or_initialize(model).register_hook(_uncond_first_hook(), "peer_caches_uncond_first")


def _apply_taylorseer(s: _Session, interval: int, order: int, warmup: int) -> None:
    from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

    _wrap_attention(s)
    for block in s._blocks:
        s.swap(block, "mlp", _Adapter(block.mlp))
    s.hook_root(s.model)
    apply_taylorseer_cache(s.model, TaylorSeerCacheConfig(
        cache_interval=interval,
        disable_cache_before_step=warmup,
        max_order=order,
        taylor_factors_dtype=torch.float32,
        cache_identifiers=[r"blocks\.\d+\.attn", r"blocks\.\d+\.mlp"],
    ))


def _require_vanilla(model: nn.Module, method: str) -> None:
    if model.stack.num_skips:
        raise ValueError(
            f"{method} runs on a vanilla model: with long skips, the fused skip inputs of the skipped units "
            "would break the cached residual"
        )


def _pair_units(s: _Session, method: str) -> nn.Module:
    """The stack units as diffusers transformer blocks, for the hooks that cache a vanilla stack's residual."""
    from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry

    model = s.model
    _require_vanilla(model, method)
    TransformerBlockRegistry.register(
        _PairUnit, TransformerBlockMetadata(return_hidden_states_index=0, return_encoder_hidden_states_index=None)
    )
    units = _PairUnits(model.stack.num_units)
    s.swap(model, "stack", _PairStackView(model.stack, units.transformer_blocks))
    return units


def _apply_magcache(s: _Session, threshold: float, max_skip_steps: int, retention_ratio: float,
                    num_inference_steps: int, mag_ratios, calibrate: bool = False) -> None:
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    if mag_ratios is None and not calibrate:
        raise ValueError("magcache needs the model's mag_ratios: take them from magcache_ratios(model, request)")
    units = _pair_units(s, "magcache")
    apply_mag_cache(units, MagCacheConfig(
        threshold=threshold, max_skip_steps=max_skip_steps, retention_ratio=retention_ratio,
        num_inference_steps=num_inference_steps, mag_ratios=None if calibrate else list(mag_ratios), calibrate=calibrate,
    ))
    s.hook_root(units)


def magcache_ratios(model: nn.Module, request) -> list[float]:
    """MagCache's magnitude ratios for `model` on `request`'s schedule: one run of diffusers' calibration
    mode (which computes every step and prints the ratios at the end; they are read from that print)."""
    import contextlib
    import io
    import re

    from skipdit_core.pipeline import generate

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), peer_cache(model, "magcache", calibrate=True,
                                                         num_inference_steps=request.steps):
        generate(model, request)
    found = re.findall(r"\[([-0-9.,e\s]+)\]", printed.getvalue())
    if not found:
        raise RuntimeError(f"diffusers' MagCache calibration printed no ratios: {printed.getvalue()!r}")
    ratios = [float(v) for v in found[-1].split(",")]
    if len(ratios) != request.steps:
        raise RuntimeError(f"MagCache calibration gave {len(ratios)} ratios for {request.steps} steps")
    return ratios


def _apply_cachedit(s: _Session, Fn: int, Bn: int, threshold: float, warmup: int, taylorseer_order: int) -> None:
    import copy
    import logging

    try:
        import cache_dit
        from cache_dit import BlockAdapter, DBCacheConfig, ForwardPattern, TaylorSeerCalibratorConfig
    except ImportError as e:
        raise ImportError("cachedit needs cache-dit: pip install cache-dit (tested with 1.5.3)") from e
    for name in list(logging.root.manager.loggerDict):  # its info and warning lines (pipe is None, pattern check
        # skipped: both expected here), several per setting, would flood the tables
        if name.lower().startswith("cache_dit"):
            logging.getLogger(name).setLevel(logging.ERROR)

    model = s.model
    _require_vanilla(model, "cachedit")
    units = model.stack.num_units
    if not (Fn >= 1 and Bn >= 0 and Fn + Bn < units):
        raise ValueError(f"cachedit: Fn={Fn} + Bn={Bn} compute units must leave some of the {units} units to cache")
    if taylorseer_order not in (0, 1, 2):
        raise ValueError(f"cachedit: taylorseer_order is 0 (reuse), 1 or 2; got {taylorseer_order}")
    config = DBCacheConfig(Fn_compute_blocks=Fn, Bn_compute_blocks=Bn, residual_diff_threshold=threshold,
                           max_warmup_steps=warmup, enable_separate_cfg=False)
    calibrator = TaylorSeerCalibratorConfig(taylorseer_order=taylorseer_order) if taylorseer_order else None
    pair_units = _PairUnits(units)
    cache_dit.enable_cache(
        BlockAdapter(transformer=pair_units, blocks=pair_units.transformer_blocks, blocks_name="transformer_blocks",
                     forward_pattern=ForwardPattern.Pattern_3,
                     check_forward_pattern=False),  # the check inspects a diffusers block's signature
        cache_config=copy.deepcopy(config), calibrator_config=copy.deepcopy(calibrator),
    )
    s._undo.append(lambda: cache_dit.disable_cache(pair_units))
    s.swap(model, "stack", _WholeStackView(model.stack, pair_units))
    # A fresh context per trajectory: cache-dit's persistent (transformer-only) context keeps its buffers and
    # step counter across calls otherwise.
    s.on_new_run.append(lambda: cache_dit.refresh_context(
        pair_units, cache_config=copy.deepcopy(config), calibrator_config=copy.deepcopy(calibrator)))


_APPLY = {"fbcache": _apply_fbcache, "pab": _apply_pab, "fastercache": _apply_fastercache, "taylorseer": _apply_taylorseer,
          "magcache": _apply_magcache, "cachedit": _apply_cachedit}


@contextmanager
def peer_cache(model: nn.Module, method: str, **params) -> Iterator[PeerStats]:
    """Apply `method` ("fbcache", "pab", "fastercache", "taylorseer", "magcache", "cachedit") to a Latte `model`
    in place for the duration; restores the model exactly on exit (also on an exception).

    params override `METHODS[method]`. The model keeps its call signature, model(x, t, y, cut=None)
    with x (B, F, C, H, W), t (B,) timesteps 0..999, y (B,) labels, so `pipeline.generate(model, req)`
    runs unchanged inside. Yields the `PeerStats` of all calls made inside the context.
    """
    if method not in METHODS:
        raise ValueError(f"unknown peer cache {method!r}; known: {', '.join(METHODS)}")
    unknown = set(params) - set(METHODS[method]) - ({"calibrate"} if method == "magcache" else set())
    if unknown:
        raise TypeError(f"{method} takes {', '.join(METHODS[method])}; got {', '.join(sorted(unknown))}")
    if getattr(model, "family", None) != "latte" or not all(
        isinstance(b, DiTBlock) and isinstance(b.attn, Attention) and isinstance(b.mlp, Mlp) for b in model.blocks
    ):
        raise ValueError("peer caches apply to a class-conditional Latte (skipdit_core.models.Latte) with no hooks attached")
    if any(hasattr(m, "_diffusers_hook") for m in model.modules()):
        raise ValueError("this model already carries diffusers hooks")
    settings = {**METHODS[method], **params}
    session = _Session(model, method, settings)
    try:
        session.start()
        _APPLY[method](session, **settings)
        for root in session.roots:
            _set_context(root)
        yield session.stats
    finally:
        session.close()


__all__ = ["METHODS", "PeerStats", "magcache_ratios", "peer_cache"]
