"""Shared test helpers: deterministic random weights, tolerant comparisons, waiting on a training run."""
from __future__ import annotations

import torch


def randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Fill every parameter (and float buffer that is persistent) with seeded noise, so that
    zero-initialised gates and output layers cannot hide a mismatch."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("pos_embed") or name.endswith("temp_embed"):
                continue  # fixed sin-cos tables: keep their exact values
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if _is_norm_weight(name, p) else 0.0))
    return module


def _is_norm_weight(name: str, p: torch.Tensor) -> bool:
    return p.ndim == 1 and "norm" in name and name.endswith("weight")


def assert_close(ours: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-5) -> None:
    """Agreement to `rtol` relative to the reference's scale (max-abs error / max-abs value)."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err = (ours.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item()
    assert err <= rtol * scale, f"max abs error {err:.3e} > {rtol} x max abs {scale:.3e}"


def wait_for_checkpoint(latest, at_least: str, seconds: float, proc, what: str) -> None:
    """Wait until the training run `proc` has named a step folder >= `at_least` in its checkpoints/latest file
    (`latest`, a Path), polling; fail the test if the run ends first or `seconds` pass."""
    import time

    import pytest

    deadline = time.time() + seconds
    while time.time() < deadline:
        if latest.exists() and latest.read_text() >= at_least:
            return
        if proc.poll() is not None:
            pytest.fail(f"{what} ended (code {proc.returncode}) before its second checkpoint")
        time.sleep(0.05)
    pytest.fail(f"{what} never wrote its second checkpoint")
