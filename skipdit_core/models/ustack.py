"""The U-shaped stack shared by every family: long skip branches and the cache cut point.

A model is a stack of L *units* (a block, or a (spatial, temporal) block pair for Latte).
With S long skips, units 0..S-1 push their output, and unit i in L-S..L-1 receives the
output of unit L-1-i (U-Net pairing: the deepest shallow output meets the first deep unit).
A receiving unit's input becomes `Linear(LayerNorm(concat([hidden, skip])))`: with the paper's
fusion ("replace", every released Skip-DiT) that replaces the hidden state; with "residual" it is
added to it, `hidden + Linear(...)`. The residual form exists for converting a pretrained model:
with the Linear at zero the branches pass the hidden state through exactly, which the replacing
form cannot (its LayerNorm's statistics mix the hidden state with the skip).

Skip-Cache needs one more thing of the stack, and it is the same for every family: a run
that is cut at depth k. A full run remembers the hidden state at the input of unit L-k
(before that unit fuses its skip) and the stack's output; a cached run executes only units
[0, k) and [L-k, L), resuming from the remembered (or forecast) state; an empty run executes
no unit and returns the output it is handed. With `residual`, what is remembered is the middle's
residual h_{L-k} - h_k instead (the change units [k, L-k) made), and a cached run resumes from its
own h_k plus it: on a stack without long skips (S = 0) that is the only way the first k units' fresh
work reaches the output (what First Block Cache and cache-dit's Fn/Bn reuse). `StackCut` carries those states; the rule deciding
what a step is lives in `skipdit_core.skip_cache`, not here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from .layers import fp32_layer_norm


SKIP_FUSIONS = ("replace", "residual")  # how a branch's output meets the hidden state (module docstring)


def check_skip_fusion(fusion: str) -> str:
    """The fusion name, or a ValueError naming the allowed ones."""
    if fusion not in SKIP_FUSIONS:
        raise ValueError(f"skip_fusion must be one of {', '.join(SKIP_FUSIONS)}, got {fusion!r}")
    return fusion


def fuse_skip(hidden: torch.Tensor, skip: torch.Tensor, norm: nn.LayerNorm, linear: nn.Linear,
              fusion: str = "replace") -> torch.Tensor:
    """The skip branch: Linear(LayerNorm(concat([hidden, skip], -1))), LayerNorm in float32; with
    fusion "residual", hidden plus that.

    hidden, skip: (N, T, D) -> (N, T, D).
    """
    x = fp32_layer_norm(torch.cat([hidden, skip], dim=-1), norm)
    out = linear(x.to(linear.weight.dtype))
    return hidden + out.to(hidden.dtype) if fusion == "residual" else out


class SkipLinear(nn.Module):
    """Holds the skip projection as `.linear`, the key layout of the Skip-DiT checkpoints
    (`skip_linears.i.linear.weight`)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(2 * hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class SkipBranchesMixin:
    """Adds the Skip-DiT skip branches as top-level lists, `skip_norms.i` and
    `skip_linears.i.linear`: the key layout of the released Skip-DiT checkpoints.
    Branch j serves the j-th receiving unit (unit L-S+j). `skip_fusion` ("replace" | "residual") is not
    in the keys: a model's config carries it (the checkpoint's metadata)."""

    skip_fusion = "replace"

    def add_skip_branches(self, num_skips: int, hidden_size: int, fusion: str = "replace") -> None:
        self.skip_fusion = check_skip_fusion(fusion)
        self.skip_norms = nn.ModuleList(
            [nn.LayerNorm(2 * hidden_size, elementwise_affine=True, eps=1e-6) for _ in range(num_skips)]
        )
        self.skip_linears = nn.ModuleList([SkipLinear(hidden_size) for _ in range(num_skips)])

    def fuse(self, j: int, hidden: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return fuse_skip(hidden, skip, self.skip_norms[j], self.skip_linears[j].linear, self.skip_fusion)


@dataclass
class StackCut:
    """Where and how a run is cut for Skip-Cache.

    depth: k, the number of units recomputed at each end (1 <= k <= number of skips).
    cached: None for a full run (which fills `captured` and `captured_output`), or the remembered
        deep state (shape of the hidden state) for a cached run.
    output: for an empty run, the stack's output to return without running any unit (shape of
        the hidden state); None otherwise.
    residual: the cut state is the middle's residual h_{L-k} - h_k rather than h_{L-k} itself;
        `entry` holds h_k (the input of unit k) while a full run is between units k and L-k.
    """

    depth: int
    cached: Optional[torch.Tensor] = None
    captured: Optional[torch.Tensor] = None
    output: Optional[torch.Tensor] = None
    captured_output: Optional[torch.Tensor] = None
    residual: bool = False
    entry: Optional[torch.Tensor] = None

    def enter_middle(self, h: torch.Tensor) -> None:
        """A full run reaches unit k with h (= h_k): a residual cut remembers it."""
        if self.residual:
            self.entry = h

    def capture(self, h: torch.Tensor) -> None:
        """A full run reaches unit L-k with h (= h_{L-k}): remember the cut state."""
        self.captured = h - self.entry if self.residual else h
        self.entry = None

    def resume(self, h: torch.Tensor) -> torch.Tensor:
        """A cached run jumps from unit k-1's output h (its fresh h_k) to unit L-k: the state it resumes from."""
        return h + self.cached if self.residual else self.cached

    @property
    def kind(self) -> str:
        """"full", "cached" (first and last k units run) or "empty" (no unit runs)."""
        return "empty" if self.output is not None else "cached" if self.cached is not None else "full"


class UStack:
    """The U-Net pairing of L units with S long skips, and the loop that runs them."""

    def __init__(self, num_units: int, num_skips: int):
        if not 0 <= 2 * num_skips <= num_units:
            raise ValueError(f"a stack of {num_units} units cannot hold {num_skips} long skips")
        self.num_units = num_units
        self.num_skips = num_skips
        # observe(i, h) is called with each unit's output as it is computed (e.g. by `skipdit analyze`).
        self.observers: list[Callable[[int, torch.Tensor], None]] = []

    @property
    def receivers(self) -> range:
        return range(self.num_units - self.num_skips, self.num_units)

    def source_of(self, unit: int) -> Optional[int]:
        """The unit whose output reaches `unit`'s input, or None."""
        return self.num_units - 1 - unit if unit in self.receivers else None

    def pairs(self) -> list[tuple[int, int]]:
        """(source, receiver) for every long skip, in the order the receivers run."""
        return [(self.source_of(r), r) for r in self.receivers]

    def units_run(self, cut: Optional[StackCut]) -> list[int]:
        """The units executed by a run with this cut."""
        L = self.num_units
        kind = "full" if cut is None else cut.kind
        if kind == "full":
            return list(range(L))
        return [] if kind == "empty" else [*range(cut.depth), *range(L - cut.depth, L)]

    @property
    def max_depth(self) -> int:
        """The deepest useful cut: k + k < L units, so a cached step skips some, and with long skips at most
        one per skip (the first k units' outputs reach the last k through them)."""
        half = (self.num_units - 1) // 2
        return min(self.num_skips, half) if self.num_skips else half

    def check_depth(self, depth: int) -> None:
        """Raise a clear error if a cut at `depth` does not fit this stack's long skips, or would skip nothing
        (2k >= L: a "cached" step would run every unit and still swap in a stale deep state)."""
        if self.num_skips and not 1 <= depth <= self.num_skips:
            raise ValueError(
                f"Skip-Cache depth k={depth} is out of range for this model: it has {self.num_skips} long skips, "
                f"so k must be in 1..{self.max_depth}"
            )
        if depth < 1:
            raise ValueError(f"Skip-Cache depth k must be at least 1, got {depth}")
        if 2 * depth >= self.num_units:
            raise ValueError(
                f"Skip-Cache depth k={depth} skips nothing on this model: a cached step runs the first and last k of "
                f"its {self.num_units} units, {2 * depth} units; k must be in 1..{self.max_depth}"
            )

    def run(
        self,
        h: torch.Tensor,
        run_unit: Callable[[int, torch.Tensor], torch.Tensor],
        fuse: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor],
        cut: Optional[StackCut] = None,
    ) -> torch.Tensor:
        """Run the units over `h`.

        run_unit(i, h) -> h runs unit i; fuse(j, h, skip) -> h applies skip branch j
        (j = receiver - (L - S)). Returns the output of the last unit (an empty cut: its `output`).
        """
        L, S = self.num_units, self.num_skips
        if cut is not None:
            self.check_depth(cut.depth)
            if cut.output is not None:
                return cut.output
        cut_at = None if cut is None else L - cut.depth
        pushed: dict[int, torch.Tensor] = {}
        for i in self.units_run(cut):
            if cut is not None and i == cut.depth:
                cut.enter_middle(h)  # only a full run reaches unit k
            if i == cut_at:
                if cut.cached is None:
                    cut.capture(h)
                else:
                    h = cut.resume(h)
            if i >= L - S:
                h = fuse(i - (L - S), h, pushed.pop(L - 1 - i))
            h = run_unit(i, h)
            for observe in self.observers:
                observe(i, h)
            if i < S:
                pushed[i] = h
        if cut is not None and cut.cached is None:
            cut.captured_output = h
        return h
