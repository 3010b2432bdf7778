"""Skip branches on ComfyUI's own Wan, without ComfyUI: the `double_block` replace patches of Load Skip Branches.

A Skip-Wan is core Wan's blocks plus S fusion branches (`skipdit_core.skip_branches`). ComfyUI's
`WanModel.forward_orig` calls a replace patch of block i as `patch(args, extra)`, with
`args = {"img", "txt", "vec", "pe", "transformer_options"}` and `extra = {"original_block"}`, and takes `["img"]` of
what it returns as the block's output. `SkipBranchPatch` on block i:

- i < S (a source): runs the block and remembers its output under unit i;
- i >= L - S (a receiver, fed by unit L-1-i): replaces its input h by Linear(LayerNorm(concat([h, skip]))), or by h
  plus that with the file's residual fusion, the LayerNorm in float32 as `skipdit_core.models.ustack.fuse_skip`, then
  runs the block.

The outputs are remembered in the model call's own `transformer_options` (the dict forward_orig passes to every
block patch of one call; ComfyUI makes one per call), under `STORE_KEY`, by unit: a dict made afresh by block 0
(every call that runs any block runs block 0) and removed by block L-1. Never on the patch, the node or the module,
so two threads, the two halves of CFG and two clones never share it. A receiver whose source did not run is an
error: under Apply Skip-Cache a cached step runs units [0, k) and [L-k, L) with k <= S, so every receiver that runs
finds its partner's output.

The branch weights live in one immutable `SkipBranchSet` (shared by clones: a deep copy returns it), which is also
the marker Apply Skip-Cache reads (`BRANCHES_KEY` in the MODEL's transformer_options) to cut the stack with its long
skips (`UStack(L, S)`). They keep their own dtype; each call uses a copy on the block input's device and dtype
(made once per device and dtype, and kept).
"""
from __future__ import annotations

import threading
from typing import Optional

import torch
import torch.nn.functional as F

from skipdit_core.models import UStack
from skipdit_core.skip_branches import LAYER_NORM_EPS, BranchInfo

BRANCHES_KEY = "skipdit_skip_branches"  # the SkipBranchSet, in model_options["transformer_options"]: the marker
STORE_KEY = "skipdit_skip_branch_outputs"  # the source blocks' outputs, in one model call's transformer_options


class _Outputs(dict):
    """Unit -> output of one model call. A copy of the options that hold it (a clone made while a call is under
    way, or left over by a failed call) does not carry the tensors."""

    def __deepcopy__(self, memo):
        return _Outputs()


class SkipBranchSet:
    """The S branches of a skip-branches file and its info. Immutable; shared between clones."""

    def __init__(self, state_dict: dict, info: BranchInfo):
        self.info = info
        self.num_layers, self.num_skips, self.dim = info.num_layers, info.num_skips, info.dim
        self.residual = info.fusion == "residual"
        self.weights = [
            tuple(state_dict[f"{prefix}.{j}{mid}.{name}"]
                  for prefix, mid in (("skip_norms", ""), ("skip_linears", ".linear")) for name in ("weight", "bias"))
            for j in range(self.num_skips)
        ]  # per branch: (norm weight, norm bias, linear weight, linear bias)
        self._cast: dict = {}
        self._lock = threading.Lock()

    def __deepcopy__(self, memo):
        return self

    @property
    def stack(self) -> UStack:
        return UStack(self.num_layers, self.num_skips)

    @property
    def dtype(self) -> torch.dtype:
        return self.weights[0][2].dtype

    def _on(self, device: torch.device, dtype: torch.dtype) -> list[tuple]:
        """The branches for an input on `device` in `dtype`: LayerNorm weights float32, Linear in `dtype`."""
        key = (str(device), dtype)
        cast = self._cast.get(key)
        if cast is None:
            with self._lock:
                cast = self._cast.get(key)
                if cast is None:
                    cast = [(nw.to(device, torch.float32), nb.to(device, torch.float32), lw.to(device, dtype),
                             lb.to(device, dtype)) for nw, nb, lw, lb in self.weights]
                    self._cast[key] = cast
        return cast

    def fuse(self, j: int, hidden: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Branch j: Linear(LayerNorm(concat([hidden, skip], -1))), hidden plus that for the residual fusion, the
        LayerNorm in float32 (`fuse_skip`)."""
        nw, nb, lw, lb = self._on(hidden.device, hidden.dtype)[j]
        x = torch.cat([hidden, skip.to(hidden.dtype)], dim=-1)
        x = F.layer_norm(x.float(), (2 * self.dim,), nw, nb, LAYER_NORM_EPS).to(hidden.dtype)
        out = F.linear(x, lw, lb)
        return hidden + out if self.residual else out

    def blocks(self) -> list[int]:
        """The blocks that get a patch: the sources 0..S-1 and the receivers L-S..L-1."""
        L, S = self.num_layers, self.num_skips
        return [*range(S), *range(L - S, L)]

    def describe(self) -> str:
        share = f", {100 * self.info.fraction:.1f}% of the Skip-Wan" if self.info.fraction else ""
        return (f"{self.num_skips} long skips on {self.num_layers} blocks (blocks 0..{self.num_skips - 1} feed "
                f"{self.num_layers - 1}..{self.num_layers - self.num_skips}), {self.info.fusion} fusion, width {self.dim}, "
                f"{self.info.parameters:,} parameters{share}, {str(self.dtype).replace('torch.', '')}")


class SkipBranchPatch:
    """The `double_block` replace patch of core Wan's block `index` (a source or a receiver of a long skip).
    `inner` is a patch another node had set on this block, called instead of the original block."""

    def __init__(self, branches: SkipBranchSet, index: int, inner=None):
        self.branches = branches
        self.index = index
        self.inner = inner

    def _run(self, args, extra):
        return self.inner(args, extra) if self.inner is not None else extra["original_block"](args)

    def __call__(self, args, extra):
        b, i = self.branches, self.index
        L, S = b.num_layers, b.num_skips
        options = args["transformer_options"]
        store = None if i == 0 else options.get(STORE_KEY)
        if store is None and i < S:  # block 0 (or the first source that runs) starts this call's outputs
            store = options[STORE_KEY] = _Outputs()
        if i >= L - S:
            source = L - 1 - i
            skip = None if store is None else store.get(source)
            if skip is None:
                raise RuntimeError(
                    f"Skip branches: block {i} needs the output of block {source}, which did not run in this model call "
                    "(another node bypassed it: connect Load Skip Branches before Apply Skip-Cache, and nothing that "
                    "skips blocks between them)")
            args = dict(args, img=b.fuse(i - (L - S), args["img"], skip))  # branch j serves block L-S+j
        out = self._run(args, extra)
        if i < S:
            store[i] = out["img"]
        if i == L - 1:
            options.pop(STORE_KEY, None)  # the call is done with them
        return out


def core_wan_problem(diffusion_model, wan_class) -> Optional[str]:
    """Why Load Skip Branches cannot patch this diffusion model (None: it can): core's `WanModel` itself, not a
    variant subclass (VACE, camera, S2V, ... add their own inputs between blocks)."""
    if not isinstance(diffusion_model, wan_class):
        return (f"Load Skip Branches: {type(diffusion_model).__name__} is not ComfyUI's Wan; the branches go on a Wan "
                "2.1 / 2.2 text-to-video model from core Load Diffusion Model")
    if type(diffusion_model) is not wan_class:
        return (f"Load Skip Branches: the Wan variant {type(diffusion_model).__name__} is not supported (its block loop "
                "adds its own inputs between blocks); the branches go on a plain Wan 2.1 / 2.2 text-to-video model")
    return None
