"""Starting a converted Skip-DiT (a vanilla checkpoint plus new long skips) as, or close to, the model it came from.

With the residual fusion (`skip_fusion: residual`: h + Linear(LayerNorm(concat([h, s])))) the start is exact: the
Linear at zero, every branch returns h, and the converted model computes the base's output (`exact_pass_through`).

The paper's fusion replaces the receiving unit's input h by Linear(LayerNorm(concat([h, s]))). The LayerNorm's
statistics mix h with the skip s, so no choice of parameters makes the branch return h exactly for every input. The
closest parameter-only start is data-dependent: the Linear keeps only the h half, scaled back by the typical standard
deviation of concat([h, s]) and shifted by its typical mean, measured on one calibration batch (as LSUV-style
initialisations do). Branches are calibrated in the order the stack runs them, each on the inputs the branches
before it produce, so the converted model tracks the base closely (the measured gap is in docs/skip-wan.md).
"""
from __future__ import annotations

import types

import torch
from torch import nn


@torch.no_grad()
def exact_pass_through(model: nn.Module) -> None:
    """Residual fusion: every branch's Linear to zero and its LayerNorm affine reset, so each branch returns its hidden
    state unchanged and the model equals the vanilla one it was converted from, bit for bit."""
    if getattr(model, "skip_fusion", None) != "residual":
        raise ValueError(f"an exact pass-through needs the residual skip fusion, the model has "
                         f"{getattr(model, 'skip_fusion', None)!r} (set model.config.skip_fusion: residual)")
    for norm, lin in zip(model.skip_norms, model.skip_linears):
        norm.reset_parameters()
        lin.linear.weight.zero_()
        lin.linear.bias.zero_()


@torch.no_grad()
def calibrate_pass_through(model: nn.Module, run_forward) -> list[tuple[float, float]]:
    """Set every skip branch of `model` to pass its hidden state through: weight [sigma * I, 0], bias mu, LayerNorm
    affine reset, with sigma / mu the mean per-token std / mean of concat([h, s]) when `run_forward()` (one forward
    of `model` on a calibration batch) reaches that branch. Returns [(sigma, mu)] per branch, in branch order.

    Every process must call it on the same batch (the statistics are not reduced across processes)."""
    if getattr(model, "skip_fusion", "replace") != "replace":
        raise ValueError(f"the calibrated pass-through is for the paper's (replace) fusion; the model has "
                         f"{model.skip_fusion!r}: use exact_pass_through")
    norms, linears = model.skip_norms, model.skip_linears
    stats: dict[int, tuple[float, float]] = {}
    fuse = type(model).fuse

    def calibrating_fuse(self, j: int, hidden: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        c = torch.cat([hidden, skip], dim=-1).float()
        sigma = torch.sqrt(c.var(dim=-1, unbiased=False) + norms[j].eps).mean().item()
        mu = c.mean(dim=-1).mean().item()
        width = hidden.shape[-1]
        norms[j].reset_parameters()
        lin = linears[j].linear
        lin.weight.zero_()
        lin.weight[:, :width].copy_(torch.eye(width, dtype=lin.weight.dtype) * sigma)
        lin.bias.fill_(mu)
        stats[j] = (sigma, mu)
        return fuse(self, j, hidden, skip)

    model.fuse = types.MethodType(calibrating_fuse, model)
    try:
        run_forward()
    finally:
        del model.fuse
    missing = [j for j in range(len(linears)) if j not in stats]
    if missing:
        raise RuntimeError(f"calibration forward did not reach skip branches {missing}")
    return [stats[j] for j in range(len(linears))]
