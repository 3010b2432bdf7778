"""The peer caching methods the benchmark compares Skip-Cache with, applied to our (vanilla) Latte or Wan.

    with peer_cache(model, "pab", spatial_skip=3) as stats:
        result = pipeline.generate(model, req)      # unchanged: one batched cond + uncond call per step
    print(stats.compute_fraction, result.seconds)

Five run through diffusers' own hooks (`diffusers.hooks`, tested with diffusers 0.42), one through cache-dit's own
`enable_cache`; none is a re-implementation. The seventh, Spectrum, has no library implementation to call: it is
implemented here (`_SpectrumStack`, `spectrum_weights`). Our models are not diffusers models, so a thin adapter
presents them the way each method expects, only for the duration of the context and only on this model instance
(no class of ours is patched, nothing in `skipdit_core` changes).

Two families: the Latte class-to-video model (`skipdit_core.models.Latte`, family "latte": its stack units are
(spatial, temporal) block PAIRS) and Wan (`skipdit_core.models.WanModel`, family "wan": one `WanBlock` per unit,
each with `self_attn`, `cross_attn` (text) and `ffn`). Both run their units through the same U-stack,
`model.stack.run(h, run_unit, fuse, cut)`, which is what the stack-level adapters replace; a unit below is "the
stack unit" of either family (a Latte pair, a Wan block).

| method        | runs through                         | families     | what the adapter does                                     |
|---------------|--------------------------------------|--------------|-----------------------------------------------------------|
| "fbcache"     | diffusers `apply_first_block_cache`  | latte, wan   | the hook's "blocks" are our stack units, each a `_StackUnit` registered in diffusers' `TransformerBlockRegistry`; `model.stack` is replaced by a view that runs every unit through its `_StackUnit` |
| "pab"         | diffusers `apply_pyramid_attention_broadcast` | latte | each `blocks.N.attn` is wrapped in `_AttentionAdapter` (a diffusers `AttentionModuleMixin`); even N are spatial, odd N temporal attention |
| "fastercache" | diffusers `apply_faster_cache`       | latte        | attention wrapped as for PAB; the denoiser-level hook (CFG-Cache) sits on the model itself, behind `_UncondFirstHook`, which presents our [cond, uncond] batch in the [uncond, cond] order the hook assumes and swaps the output back |
| "taylorseer"  | diffusers `apply_taylorseer_cache`   | latte, wan   | Latte: each `blocks.N.attn` and `blocks.N.mlp` is wrapped (`_AttentionAdapter`, `_Adapter`); Wan: each `blocks.N.self_attn`, `blocks.N.cross_attn` and `blocks.N.ffn` (`_Adapter`); all are predicted by Taylor expansion (TaylorSeer's DiT code predicts attention and MLP outputs; diffusers' default hooks attention only) |
| "magcache"    | diffusers `apply_mag_cache`          | latte, wan   | as FBCache: the hook's blocks are the stack units (`_StackUnit`); its magnitude ratios come from diffusers' own calibration mode (`magcache_ratios`) |
| "cachedit"    | cache-dit's `enable_cache` (DBCache, optional TaylorSeer / FoCa / DMD calibrator; `pip install cache-dit`, tested with 1.5.3) | latte, wan | cache-dit's transformer-only path: a `BlockAdapter` over `_StackUnits` (FBCache's holder of the `_StackUnit`s), whose forward loops over them (cache-dit swaps that list for its cached blocks during the forward); `model.stack` runs the whole stack through it |
| "spectrum"    | ours (Spectrum, Han et al., CVPR 2026, arXiv 2603.01623) | latte, wan, also with long skips | `model.stack` is replaced by `_SpectrumStack`: a full step runs the real stack and remembers its output (the hidden state the final layer receives) with its timestep; a cached step runs no unit and returns a Chebyshev ridge-regression forecast of that output |

Why pairs for FBCache on Latte: applied to the 2L raw blocks, the hook's tail residual would be "last temporal
block output minus first spatial block output", two tensors in different layouts ((B*T, F, D) vs
(B*F, T, D)), and the temporal embedding added after block 0 would sit inside the cached span. A pair
starts and ends in the spatial layout, so head and tail residuals live in one layout; the head unit
(always computed) is the first pair, 2 of the 2L blocks. On Wan a unit is one block, (N, T, D) on both sides.

Common to all methods:
- the current timestep comes from a forward pre-hook on the model (the hooks' `current_timestep_callback`): the
  call's largest (all are equal, but for the t = 0 image frame of a Wan 2.2 TI2V call);
- a model call whose timestep is not below the previous call's starts a new trajectory: every hook's
  state is reset (`HookRegistry.reset_stateful_hooks`, and the state kept outside diffusers' hooks), so any
  number of `generate()` runs can share one context; `PeerStats` accumulates over them (`runs` counts them);
- state is kept per batched call (the CFG halves are one call, one diffusers cache context "batch");
- the hooks are never attached to our own attention / MLP modules, only to adapters, so a forward
  pre-hook on our modules counts exactly the calls that really ran (`PeerStats`); what is counted and what
  an uncached call costs is the one per-family piece (`_LatteCost`, `_WanCost`);
- on exit the model is restored exactly: adapters swapped back, hooks removed, the attributes diffusers
  adds (`forward`, `_diffusers_hook`) deleted.

Knobs (defaults in `METHODS`, for a 50-step run with guidance; timesteps are 0..1000: Latte's original 0..999,
Wan's sigma * 1000):
- fbcache: `threshold` — skip units 1..L-1 when the first unit's residual changed by less than this
  (relative mean abs); 0 = never skip.
- pab (Latte only): `spatial_skip`, `temporal_skip` — compute each attention every N-th step inside `window`
  (exclusive timestep bounds), broadcast the last output otherwise; 1 = never skip. Defaults 2 / 3
  in (100, 800): diffusers' default window, temporal broadcast longer than spatial as in PAB.
- fastercache (Latte only): `uncond_skip` — compute the unconditional half only every N-th step inside
  `uncond_window` and approximate it in frequency space from the conditional half (CFG-Cache);
  `attention_skip` — on those half-batch steps, attention is computed every N-th step inside
  `attention_window` and extrapolated otherwise (our choice: spatial and temporal alike, where
  diffusers' default leaves temporal attention alone; weight 0.5, diffusers' default; the other
  windows and the frequency weights are diffusers' defaults). uncond_skip=1 = never skip. Needs the
  guided batch of a class-conditional model (a ValueError otherwise).
- taylorseer: `interval` — full compute every N steps after `warmup` full steps, attention / MLP
  (Wan: self-attention, cross-attention, feed-forward) outputs predicted by an order-`order` Taylor expansion
  in between (factors kept in float32); 1 = never skip.
- cachedit: DBCache. `Fn` / `Bn` — the first / last units always computed; `threshold` — the middle
  units are skipped (their last residual reused) when the first `Fn` units' residual changed by less than
  this (relative L1); `warmup` — full steps first (cache-dit's `max_warmup_steps`, default 8);
  `calibrator` — what forecasts the reused residual: "taylorseer" (default) with `taylorseer_order` 1-2
  (cache-dit's `TaylorSeerCalibratorConfig`; order 0, the default, is plain reuse, so `{"taylorseer_order": 1}`
  alone keeps meaning TaylorSeer), "foca" (`FoCaCalibratorConfig`: BDF2 predictor + Heun corrector, no knob),
  "dmd" (`DMDCalibratorConfig`: dynamic-mode-decomposition forecast over the last `dmd_history` full steps,
  cache-dit's default 6; its other fields keep cache-dit's defaults), "none" (plain reuse); `taylorseer_order`
  must stay 0 with the others. One cache-dit context per setting, refreshed at every new trajectory; cond and
  uncond are one batched call (`enable_separate_cfg=False`). threshold=0 = never skip.
- magcache: `threshold` — skip every unit (the output is the input plus the last residual) while the
  error accumulated from the calibrated magnitude ratios stays below it, at most `max_skip_steps` in a
  row, never in the first `retention_ratio` of the `num_inference_steps` steps (diffusers' defaults);
  `mag_ratios`: the model's ratios per step, from `magcache_ratios(model, request)` (diffusers'
  calibration run); max_skip_steps=0 = never skip.
- spectrum: the stack output h(t) is treated as a function of the timestep and fitted, per feature, with a
  Chebyshev series of degree `order` in tau = t / 500 - 1 (t in [0, 1000] -> [-1, 1]) by ridge regression
  (weight `ridge`) over the last `history` full steps (history > order: a fit, not an interpolation), in
  float32 or wider; the fit is evaluated at the cached step's timestep. Schedule (the authors' adaptive one,
  their Appendix B.1 as their code runs it): `warmup` full steps first; then a window of `interval` steps
  (floored) holds one full step at its end (interval - 1 cached steps before it), and after each such full step
  the window grows by `grow` (the authors' alpha; 0 = a full step every `interval` steps). No final full step is
  forced (the authors' code forces none). Defaults: the authors' settings (warm-up 5, N = 2, alpha = 0.75:
  14 full steps of 50; degree 4, i.e. T_0..T_4, their m = 4; lambda = 0.1; up to 100 past full steps in the
  fit, as their code, so every one of a 50-step run).
  interval=1 = never skip (whatever `grow`): the uncached model, bit for bit. Works with long skips too (the
  whole stack call is replaced); a Skip-Cache cut inside it is refused.
  Not implemented: the authors' later option of blending the forecast with a linear extrapolation (their `w`,
  default 1.0 = the pure Chebyshev forecast used here). Their code fits in the step index (fixed [0, 50]); we fit
  in the timestep, as asked of this benchmark, which is the same up to an affine map on a uniform schedule.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from skipdit_core.diffusion import CFG_CONVENTIONS
from skipdit_core.models.layers import Attention, DiTBlock, Mlp
from skipdit_core.models.wan import WanBlock, WanCrossAttention, WanSelfAttention

METHODS: dict[str, dict[str, Any]] = {
    "fbcache": {"threshold": 0.05},
    "pab": {"spatial_skip": 2, "temporal_skip": 3, "window": (100, 800)},
    "fastercache": {"uncond_skip": 5, "attention_skip": 2, "uncond_window": (-1, 641), "attention_window": (-1, 681)},
    "taylorseer": {"interval": 4, "order": 2, "warmup": 3},
    "magcache": {"threshold": 0.06, "max_skip_steps": 3, "retention_ratio": 0.2, "num_inference_steps": 50,
                 "mag_ratios": None},
    "cachedit": {"Fn": 1, "Bn": 0, "threshold": 0.08, "warmup": 8, "taylorseer_order": 0, "calibrator": "taylorseer",
                 "dmd_history": 6},
    "spectrum": {"warmup": 5, "interval": 2, "grow": 0.75, "order": 4, "history": 100, "ridge": 0.1},
}
_LATTE_ONLY = ("pab", "fastercache")  # they need Latte's spatial / temporal attention split
CACHEDIT_CALIBRATORS = ("taylorseer", "foca", "dmd", "none")

# Module names of the attention layers as the hooks see them (`blocks.N.attn`, N even: spatial).
_SPATIAL_ATTN = r"^blocks\.\d*[02468]\.attn$"
_TEMPORAL_ATTN = r"^blocks\.\d*[13579]\.attn$"
_CONTEXT = "batch"  # one diffusers cache context: cond and uncond run as one batched call


@dataclass
class PeerStats:
    """What a context computed, next to what the uncached runs of the same calls would have.

    Calls count executions of our attention / MLP modules (Latte: `attn`, `mlp`; Wan: `self_attn` and
    `cross_attn` both count as attention calls, two per block, `ffn` as the MLP call; a half-batch call of
    FasterCache counts as one); MACs are the multiply-adds of those calls (Latte: qkv, proj, the two attention
    matmuls, fc1, fc2; Wan: q, k, v, o and the two attention matmuls of both attentions, the two ffn linears),
    so a half-batch call counts half. `compute_fraction` = macs / macs_total is the benchmark's compute
    fraction (embedders, adaLN / modulation, norms and the final layer are left out of both).
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


def _cross_attn_macs(n: int, t: int, s: int, d: int) -> int:
    """Cross-attention of t query tokens over s context tokens, width d: q and o on the queries, k and v on the
    context, QK^T and AV."""
    return 2 * n * t * d * d + 2 * n * s * d * d + 2 * n * t * s * d


def _mlp_macs(rows: int, d: int, hidden: int) -> int:
    return 2 * rows * d * hidden


def _arg(args: tuple, kwargs: dict, index: int, name: str):
    return args[index] if len(args) > index else kwargs[name]


# ------------------------------------------------------------------------------------------- adapters


def _diffusers_attention_mixin() -> type:
    from diffusers.models.attention import AttentionModuleMixin

    return AttentionModuleMixin


class _Adapter(nn.Module):
    """Stands in for one of our modules so that diffusers' hooks attach here, not to it.
    forward(*args, **kwargs) = inner(*args, **kwargs) (Latte's attn / mlp: (N, T, D) -> (N, T, D); Wan's
    self_attn(x, rope), cross_attn(x, context), ffn(x): (N, T, D) out)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.inner(*args, **kwargs)


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


class _StackUnit(nn.Module):
    """Unit i of the stack (a Latte (spatial, temporal) block pair, a Wan block) as a diffusers transformer block.

    forward(hidden_states, run_unit) -> run_unit(i, hidden_states): the unit's input layout on both sides
    (Latte: (B*F, T, D), the spatial layout; Wan: (B, T, D)). run_unit is the model's own unit function (blocks,
    rearranges, temporal embedding; Wan's block with its time embedding, text and RoPE), so nothing of the
    computation is re-implemented here.
    """

    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def forward(self, hidden_states: torch.Tensor, run_unit: Callable) -> torch.Tensor:
        return run_unit(self.index, hidden_states)


class _StackUnits(nn.Module):
    """The `_StackUnit`s under the name diffusers' FBCache / MagCache look for (`transformer_blocks`); as a
    module, forward(hidden_states, run_unit) runs them in order: the shape cache-dit patches (it swaps that list
    for its cached blocks during the forward)."""

    def __init__(self, n: int):
        super().__init__()
        self.transformer_blocks = nn.ModuleList([_StackUnit(i) for i in range(n)])

    def forward(self, hidden_states: torch.Tensor, run_unit: Callable) -> torch.Tensor:
        for block in self.transformer_blocks:
            hidden_states = block(hidden_states, run_unit)
        return hidden_states


class _WholeStackView:
    """Replaces a vanilla `model.stack` for the context: the whole run is one `_StackUnits` call (what
    cache-dit wraps). No skip branch to fuse and no cut: that holds for the vanilla twin only."""

    def __init__(self, stack, units: _StackUnits):
        self._stack, self._units = stack, units

    def run(self, h, run_unit, fuse, cut=None):
        if cut is not None or self._stack.observers:
            raise ValueError("cachedit runs the whole vanilla stack: no stack cut, no observers")
        return self._units(h, run_unit)

    def __getattr__(self, name):
        return getattr(self._stack, name)


class _UnitStackView:
    """Replaces `model.stack` for the context: the same UStack run, every unit through its `_StackUnit`."""

    def __init__(self, stack, units: nn.ModuleList):
        self._stack, self._units = stack, units

    def run(self, h, run_unit, fuse, cut=None):
        return self._stack.run(h, lambda i, z: self._units[i](z, run_unit), fuse, cut)

    def __getattr__(self, name):
        return getattr(self._stack, name)


# ------------------------------------------------------------------------------------------- Spectrum


def timestep_tau(t: float) -> float:
    """Spectrum's time variable: a timestep in [0, 1000] mapped affinely onto the Chebyshev interval [-1, 1]."""
    return t / 500.0 - 1.0


def chebyshev_basis(tau: torch.Tensor, order: int) -> torch.Tensor:
    """(K,) points -> (K, order + 1): T_0 .. T_order at each point (T_{m+1} = 2 tau T_m - T_{m-1})."""
    cols = [torch.ones_like(tau), tau][: order + 1]
    while len(cols) <= order:
        cols.append(2 * tau * cols[-1] - cols[-2])
    return torch.stack(cols, dim=-1)


def spectrum_weights(taus, tau: float, order: int, ridge: float) -> torch.Tensor:
    """The weights w (K,) float64 for which sum_k w_k h_k is Spectrum's forecast at `tau`.

    The forecast is the ridge-regression fit of a Chebyshev series of degree `order` to the K points
    (taus_k, h_k), evaluated at tau: coefficients C = (X^T X + ridge I)^-1 X^T H with X the (K, order + 1)
    basis at the taus, forecast x(tau)^T C. Being linear in H, it is w^T H with w = X (X^T X + ridge I)^-1 x(tau),
    so the features never need to be stacked: the small system is solved in float64 (a pseudo-inverse, so
    ridge = 0 with fewer points than coefficients still gives the minimum-norm fit) and the forecast is
    accumulated feature by feature in float32. With ridge = 0 and more points than the degree, a feature that
    is a polynomial of degree <= order in tau is reproduced exactly.
    """
    taus = torch.as_tensor(taus, dtype=torch.float64).reshape(-1)
    X = chebyshev_basis(taus, order)
    x = chebyshev_basis(torch.tensor([float(tau)], dtype=torch.float64), order)[0]
    gram = X.T @ X + ridge * torch.eye(order + 1, dtype=torch.float64)
    return X @ (torch.linalg.pinv(gram) @ x)


class _SpectrumStack:
    """Replaces `model.stack` for the context (Spectrum): `run` either runs the real stack (a full step) and
    remembers its output with the step's timestep, or runs no unit and returns the forecast of that output.
    The schedule and the history are per trajectory (`reset`, called at every new trajectory)."""

    def __init__(self, stack, session: "_Session", warmup: int, interval: int, grow: float, order: int,
                 history: int, ridge: float):
        self._stack, self._session = stack, session
        self._warmup, self._interval, self._grow = warmup, interval, grow
        self._order, self._history, self._ridge = order, history, ridge
        self.reset()

    def reset(self) -> None:
        self._step = 0  # model calls so far in this trajectory
        self._window = float(self._interval)
        self._since_full = 0  # cached steps since the last full one
        self._taus: list[float] = []
        self._features: list[torch.Tensor] = []

    def _is_full(self) -> bool:
        if self._step < self._warmup or self._interval == 1 or not self._features:
            return True
        if self._since_full + 1 >= math.floor(self._window):
            self._window = round(self._window + self._grow, 6)
            return True
        return False

    def run(self, h, run_unit, fuse, cut=None):
        if cut is not None:
            raise ValueError("spectrum replaces the whole stack call: it takes no Skip-Cache cut")
        tau = timestep_tau(self._session.t)
        full = self._is_full()
        self._step += 1
        if full:
            out = self._stack.run(h, run_unit, fuse, None)
            self._since_full = 0
            self._taus = (self._taus + [tau])[-self._history:]
            self._features = (self._features + [out.detach()])[-self._history:]
            return out
        self._since_full += 1
        last = self._features[-1]
        if last.shape != h.shape:
            raise ValueError(f"spectrum: the stack input {tuple(h.shape)} changed within a trajectory "
                             f"(its remembered outputs are {tuple(last.shape)})")
        weights = spectrum_weights(self._taus, tau, self._order, self._ridge).tolist()
        forecast = torch.zeros(last.shape, dtype=torch.float32, device=last.device)
        for w, feature in zip(weights, self._features):
            forecast.add_(feature.float(), alpha=w)
        return forecast.to(last.dtype)

    def __getattr__(self, name):
        return getattr(self._stack, name)


# ----------------------------------------------------------------------------------- per-family pieces


class _LatteCost:
    """Latte: what TaylorSeer wraps, which of our modules are counted, and the cost of an uncached call.
    Counted: `blocks.N.attn` (self-attention over (N, T, D): spatial or temporal) and `blocks.N.mlp`."""

    name = "latte"
    forecast = (("attn", _AttentionAdapter), ("mlp", _Adapter))  # TaylorSeer's wrapped submodules, per block

    @staticmethod
    def fits(model: nn.Module) -> bool:
        return all(isinstance(b, DiTBlock) and isinstance(b.attn, Attention) and isinstance(b.mlp, Mlp)
                   for b in model.blocks)

    def __init__(self, model: nn.Module):
        self.model = model
        self.blocks = list(model.blocks)
        self.hidden = model.config.hidden_size
        self.mlp_hidden = self.blocks[0].mlp.fc1.out_features

    def counted(self) -> Iterator[tuple[nn.Module, str, Callable]]:
        """(our module, "attn" | "mlp", macs(module, args, kwargs) of one call)."""
        for block in self.blocks:
            yield block.attn, "attn", lambda m, args, kwargs: _attn_macs(*args[0].shape)
            yield block.mlp, "mlp", lambda m, args, kwargs: _mlp_macs(
                args[0].numel() // args[0].shape[-1], args[0].shape[-1], m.fc1.out_features)

    def per_call(self, args: tuple, kwargs: dict) -> tuple[int, int, int]:
        """(attention calls, MLP calls, MACs) of the uncached model call with these inputs."""
        b, f, _, h, w = _arg(args, kwargs, 0, "x").shape
        p = self.model.config.patch_size
        t, d = (h // p) * (w // p), self.hidden
        pair = _attn_macs(b * f, t, d) + _attn_macs(b * t, f, d) + 2 * _mlp_macs(b * f * t, d, self.mlp_hidden)
        return len(self.blocks), len(self.blocks), pair * (len(self.blocks) // 2)


class _WanCost:
    """Wan: counted are `blocks.N.self_attn` (over (N, T, D)), `blocks.N.cross_attn` (T queries over the S text
    tokens) and `blocks.N.ffn`; TaylorSeer wraps the same three."""

    name = "wan"
    forecast = (("self_attn", _Adapter), ("cross_attn", _Adapter), ("ffn", _Adapter))

    @staticmethod
    def fits(model: nn.Module) -> bool:
        return all(isinstance(b, WanBlock) and type(b.self_attn) is WanSelfAttention
                   and type(b.cross_attn) is WanCrossAttention and isinstance(b.ffn, nn.Sequential)
                   for b in model.blocks)

    def __init__(self, model: nn.Module):
        self.config = model.config
        self.blocks = list(model.blocks)

    def counted(self) -> Iterator[tuple[nn.Module, str, Callable]]:
        for block in self.blocks:
            yield block.self_attn, "attn", lambda m, args, kwargs: _attn_macs(*args[0].shape)
            yield block.cross_attn, "attn", lambda m, args, kwargs: _cross_attn_macs(
                *args[0].shape[:2], _arg(args, kwargs, 1, "context").shape[1], args[0].shape[2])
            yield block.ffn, "mlp", lambda m, args, kwargs: _mlp_macs(
                args[0].numel() // args[0].shape[-1], args[0].shape[-1], m[0].out_features)

    def per_call(self, args: tuple, kwargs: dict) -> tuple[int, int, int]:
        c = self.config
        n, _, f, h, w = _arg(args, kwargs, 0, "x").shape
        pt, ph, pw = c.patch_size
        t = (f // pt) * (h // ph) * (w // pw)
        s = max(_arg(args, kwargs, 2, "encoder_hidden_states").shape[1], c.text_len)  # the model pads to text_len
        block = _attn_macs(n, t, c.dim) + _cross_attn_macs(n, t, s, c.dim) + _mlp_macs(n * t, c.dim, c.ffn_dim)
        return 2 * len(self.blocks), len(self.blocks), block * len(self.blocks)


_FAMILIES = {"latte": _LatteCost, "wan": _WanCost}


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

    def __init__(self, model: nn.Module, method: str, params: dict, cost: type):
        self.model = model
        self.cost = cost(model)
        self.stats = PeerStats(method, dict(params))
        self.t: float | None = None  # the current call's timestep, for the hooks' callbacks
        self.roots: list[nn.Module] = []  # modules whose diffusers hook trees hold state
        self.check_inputs: Callable | None = None
        self.on_new_run: list[Callable[[], None]] = []  # resets of state kept outside diffusers' hooks
        self._last_t: float | None = None
        self._undo: list[Callable[[], None]] = []
        self._blocks = list(model.blocks)

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
        for module, kind, macs in self.cost.counted():
            self._undo.append(module.register_forward_pre_hook(self._counter(kind, macs), with_kwargs=True).remove)

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
        t = float(torch.as_tensor(_arg(args, kwargs, 1, "t")).max())  # Wan 2.2 TI2V gives its image frame t = 0
        if self._last_t is None or t >= self._last_t:
            self._new_run()
        self._last_t = self.t = t
        if self.check_inputs is not None:
            self.check_inputs(args, kwargs)
        attn, mlp, macs = self.cost.per_call(args, kwargs)
        s = self.stats
        s.forwards += 1
        s.attn_calls_total += attn
        s.mlp_calls_total += mlp
        s.macs_total += macs

    def _counter(self, kind: str, macs: Callable) -> Callable:
        def count(module, args, kwargs):
            if kind == "attn":
                self.stats.attn_calls += 1
            else:
                self.stats.mlp_calls += 1
            self.stats.macs += macs(module, args, kwargs)

        return count

    def _new_run(self) -> None:
        self.stats.runs += 1
        if self.roots:
            from diffusers.hooks import HookRegistry

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

    units = _stack_units(s, "fbcache")
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

    for name, adapter in s.cost.forecast:
        for block in s._blocks:
            s.swap(block, name, adapter(getattr(block, name)))
    s.hook_root(s.model)
    apply_taylorseer_cache(s.model, TaylorSeerCacheConfig(
        cache_interval=interval,
        disable_cache_before_step=warmup,
        max_order=order,
        taylor_factors_dtype=torch.float32,
        cache_identifiers=[rf"blocks\.\d+\.{name}" for name, _ in s.cost.forecast],
    ))


def _require_vanilla(model: nn.Module, method: str) -> None:
    if model.stack.num_skips:
        raise ValueError(
            f"{method} runs on a vanilla model: with long skips, the fused skip inputs of the skipped units "
            "would break the cached residual"
        )


def _stack_units(s: _Session, method: str) -> nn.Module:
    """The stack units as diffusers transformer blocks, for the hooks that cache a vanilla stack's residual."""
    from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry

    model = s.model
    _require_vanilla(model, method)
    TransformerBlockRegistry.register(
        _StackUnit, TransformerBlockMetadata(return_hidden_states_index=0, return_encoder_hidden_states_index=None)
    )
    units = _StackUnits(model.stack.num_units)
    s.swap(model, "stack", _UnitStackView(model.stack, units.transformer_blocks))
    return units


def _apply_magcache(s: _Session, threshold: float, max_skip_steps: int, retention_ratio: float,
                    num_inference_steps: int, mag_ratios, calibrate: bool = False) -> None:
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    if mag_ratios is None and not calibrate:
        raise ValueError("magcache needs the model's mag_ratios: take them from magcache_ratios(model, request)")
    units = _stack_units(s, "magcache")
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


def _cachedit_calibrator(calibrator: str, taylorseer_order: int, dmd_history: int):
    """cache-dit's calibrator config for these knobs, or None (plain reuse of the last residual)."""
    from cache_dit import DMDCalibratorConfig, FoCaCalibratorConfig, TaylorSeerCalibratorConfig

    if calibrator not in CACHEDIT_CALIBRATORS:
        raise ValueError(f"cachedit: calibrator is one of {', '.join(CACHEDIT_CALIBRATORS)}; got {calibrator!r}")
    if taylorseer_order not in (0, 1, 2):
        raise ValueError(f"cachedit: taylorseer_order is 0 (reuse), 1 or 2; got {taylorseer_order}")
    if taylorseer_order and calibrator != "taylorseer":
        raise ValueError(f"cachedit: taylorseer_order is the taylorseer calibrator's order; calibrator={calibrator!r} "
                         "takes none (leave it at 0)")
    if calibrator == "dmd" and not (isinstance(dmd_history, int) and dmd_history >= 2):
        raise ValueError(f"cachedit: dmd_history is a number of full steps >= 2; got {dmd_history!r}")
    if calibrator == "taylorseer":
        return TaylorSeerCalibratorConfig(taylorseer_order=taylorseer_order) if taylorseer_order else None
    if calibrator == "foca":
        return FoCaCalibratorConfig()
    if calibrator == "dmd":
        return DMDCalibratorConfig(dmd_history=dmd_history)
    return None


def _apply_cachedit(s: _Session, Fn: int, Bn: int, threshold: float, warmup: int, taylorseer_order: int,
                    calibrator: str, dmd_history: int) -> None:
    import copy
    import logging

    try:
        import cache_dit
        from cache_dit import BlockAdapter, DBCacheConfig, ForwardPattern
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
    calibrator_config = _cachedit_calibrator(calibrator, taylorseer_order, dmd_history)
    config = DBCacheConfig(Fn_compute_blocks=Fn, Bn_compute_blocks=Bn, residual_diff_threshold=threshold,
                           max_warmup_steps=warmup, enable_separate_cfg=False)
    stack_units = _StackUnits(units)
    cache_dit.enable_cache(
        BlockAdapter(transformer=stack_units, blocks=stack_units.transformer_blocks, blocks_name="transformer_blocks",
                     forward_pattern=ForwardPattern.Pattern_3,
                     check_forward_pattern=False),  # the check inspects a diffusers block's signature
        cache_config=copy.deepcopy(config), calibrator_config=copy.deepcopy(calibrator_config),
    )
    s._undo.append(lambda: cache_dit.disable_cache(stack_units))
    s.swap(model, "stack", _WholeStackView(model.stack, stack_units))
    # A fresh context per trajectory: cache-dit's persistent (transformer-only) context keeps its buffers and
    # step counter across calls otherwise.
    s.on_new_run.append(lambda: cache_dit.refresh_context(
        stack_units, cache_config=copy.deepcopy(config), calibrator_config=copy.deepcopy(calibrator_config)))


def _apply_spectrum(s: _Session, warmup: int, interval: int, grow: float, order: int, history: int,
                    ridge: float) -> None:
    def whole(v, low):
        return isinstance(v, int) and not isinstance(v, bool) and v >= low

    if not (whole(warmup, 0) and whole(interval, 1) and whole(order, 0) and whole(history, order + 1)):
        raise ValueError(f"spectrum: warmup >= 0, interval >= 1, order >= 0 and history > order are whole numbers; "
                         f"got warmup={warmup}, interval={interval}, order={order}, history={history}")
    if not (grow >= 0 and ridge >= 0):
        raise ValueError(f"spectrum: grow and ridge are >= 0; got grow={grow}, ridge={ridge}")
    view = _SpectrumStack(s.model.stack, s, warmup, interval, grow, order, history, ridge)
    s.swap(s.model, "stack", view)
    s.on_new_run.append(view.reset)


_APPLY = {"fbcache": _apply_fbcache, "pab": _apply_pab, "fastercache": _apply_fastercache, "taylorseer": _apply_taylorseer,
          "magcache": _apply_magcache, "cachedit": _apply_cachedit, "spectrum": _apply_spectrum}


@contextmanager
def peer_cache(model: nn.Module, method: str, **params) -> Iterator[PeerStats]:
    """Apply `method` (a key of `METHODS`) to a Latte or Wan `model` in place for the duration; restores the
    model exactly on exit (also on an exception). "pab" and "fastercache" take a Latte only.

    params override `METHODS[method]`. The model keeps its call signature (Latte: model(x, t, y, cut=None) with
    x (B, F, C, H, W), t (B,) timesteps 0..999, y (B,) labels; Wan: model(x, t, encoder_hidden_states, cut=None)
    with x (B, C, F, H, W), t (B,) sigma * 1000), so `pipeline.generate(model, req)` runs unchanged inside.
    Yields the `PeerStats` of all calls made inside the context.
    """
    if method not in METHODS:
        raise ValueError(f"unknown peer cache {method!r}; known: {', '.join(METHODS)}")
    unknown = set(params) - set(METHODS[method]) - ({"calibrate"} if method == "magcache" else set())
    if unknown:
        raise TypeError(f"{method} takes {', '.join(METHODS[method])}; got {', '.join(sorted(unknown))}")
    family = getattr(model, "family", None)
    cost = _FAMILIES.get(family)
    if cost is None or not cost.fits(model):
        raise ValueError("peer caches apply to a Latte (skipdit_core.models.Latte) or a Wan "
                         "(skipdit_core.models.WanModel) with no hooks attached")
    if method in _LATTE_ONLY and family != "latte":
        raise ValueError(f"{method} applies to a Latte model only (it needs Latte's spatial / temporal attention); "
                         f"this model's family is {family}")
    if any(hasattr(m, "_diffusers_hook") for m in model.modules()):
        raise ValueError("this model already carries diffusers hooks")
    settings = {**METHODS[method], **params}
    session = _Session(model, method, settings, cost)
    try:
        session.start()
        _APPLY[method](session, **settings)
        for root in session.roots:
            _set_context(root)
        yield session.stats
    finally:
        session.close()


__all__ = ["METHODS", "PeerStats", "magcache_ratios", "peer_cache", "spectrum_weights"]
