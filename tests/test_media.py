"""The fidelity metrics as the field computes them."""
from __future__ import annotations

import pytest
import torch

from skipdit_core.media import psnr, ssim


@pytest.mark.parametrize("shape,data_range", [((8, 3, 16, 16), 2.0), ((2, 3, 32, 48), 2.0), ((4, 4, 24, 24), 5.0)])
def test_ssim_equals_torchmetrics_gaussian_11x11(shape, data_range):
    tm = pytest.importorskip("torchmetrics.functional.image")
    g = torch.Generator().manual_seed(0)
    a = (torch.rand(shape, generator=g, dtype=torch.float64) - 0.5) * data_range
    b = (a + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)).clamp(-data_range / 2, data_range / 2)
    ref = float(tm.structural_similarity_index_measure(b, a, data_range=data_range))
    assert abs(ssim(b, a, data_range) - ref) < 1e-6
    assert ssim(a, a, data_range) == pytest.approx(1.0)


def test_ssim_on_frames_smaller_than_the_window_and_psnr():
    a = torch.zeros(2, 3, 8, 8)
    b = a + 0.2
    assert 0 < ssim(a, b) < 1 and ssim(a, a) == pytest.approx(1.0)
    assert psnr(a, b, 2.0) == pytest.approx(10 * torch.log10(torch.tensor(4 / 0.04)).item(), rel=1e-6)
    assert psnr(a, a) == float("inf")
