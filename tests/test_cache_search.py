"""Choosing a Skip-Cache setting on several trajectories (skipdit_core.cache_search) and the presets named by
speed (skipdit_core.skip_cache_presets)."""
from __future__ import annotations

import pytest
import torch
from helpers import randomize

from skipdit_core.cache_search import Reference, block_compute, candidates, score, search
from skipdit_core.models import build_model, make_config
from skipdit_core.pipeline import Request
from skipdit_core.skip_cache import SkipCacheConfig, simulate
from skipdit_core.skip_cache_presets import PRESET_SPEEDS, PRESETS, preset_config, preset_names, speed_budget


@pytest.fixture(scope="module")
def latte():
    torch.manual_seed(0)
    return randomize(build_model("latte", make_config("latte", {"skip": True, "depth": 8}, preset="Latte-tiny")),
                     seed=1).eval()


def requests(model, seeds=(0, 1), labels=(0,)):
    c = model.config
    return [Request("latte", label=k, frames=2, size=8, sampler="ddim", steps=8, guidance=3.0, seed=s)
            for k in labels for s in seeds]


def test_candidates_cover_intervals_forecasts_and_empty_steps():
    cands = candidates(has_skips=True, intervals=(2, 3))
    assert len(cands) == len(set(cands))
    assert SkipCacheConfig(interval=3, start=1000, end=0, forecast=1, forecast_damping=0.7, empty_steps=2,
                           forecast_warmup=True) in cands
    assert all(c.empty_steps == 0 for c in cands if c.forecast == 0)
    assert all(c.start == 1000 and c.end == 0 and c.reuse == "state" for c in cands)


def test_block_compute_is_the_schedules():
    ts = [999.0 - 20 * i for i in range(50)]
    c = SkipCacheConfig(interval=3, start=1000, end=0)
    stats = simulate(c, ts, 14, 7, "latte")
    assert block_compute(c, ts, 14, 7, "latte") == stats.blocks_run / stats.blocks_uncached
    assert block_compute(SkipCacheConfig(interval=1), ts, 14, 7, "latte") == 1.0


@torch.no_grad()
def test_search_stays_within_budget_ranks_by_mean_psnr_and_is_deterministic(latte):
    reqs = requests(latte)
    cands = candidates(True, intervals=(2, 3))
    ref = Reference(latte, reqs)
    rows = search(latte, reqs, 0.6, cands, keep=3, first=1, reference=ref)
    assert len(rows) == 1 and rows[0]["trajectories"] == len(reqs)  # halving ends on every trajectory
    assert rows[0]["compute"] <= 0.6
    assert rows[0]["psnr_min"] <= rows[0]["psnr"] <= rows[0]["psnr_max"]
    # the same search again (the reference reused): the same choice and figures
    again = search(latte, reqs, 0.6, cands, keep=3, first=1, reference=ref)
    assert again[0]["config"] == rows[0]["config"] and again[0]["psnr"] == rows[0]["psnr"]
    # the entrants are the 3 candidates closest to the budget, and the winner is the best of the last round
    ts = ref.schedule()  # from the uncached run of the first request
    assert len(ts) == 8
    cost = {c: block_compute(c, ts, 4, 2, "latte") for c in cands}
    entered = sorted([c for c in cands if cost[c] <= 0.6], key=lambda c: -cost[c])[:3]
    assert rows[0]["config"] in entered and rows[0]["compute"] == cost[rows[0]["config"]]


@torch.no_grad()
def test_uncached_setting_scores_as_identical(latte):
    ref = Reference(latte, requests(latte, seeds=(0,), labels=(0,)))
    s = score(latte, SkipCacheConfig(interval=1), ref, 1)
    assert s["psnr"] == 99.0 and s["ssim"] == pytest.approx(1.0)


def test_budget_below_every_candidate_is_one_clear_error(latte):
    with pytest.raises(ValueError, match=r"no candidate uses at most 1% of the block compute \(the cheapest uses"):
        search(latte, requests(latte, seeds=(0,), labels=(0,)), 0.01, candidates(True, intervals=(2,)))


def test_presets_are_named_by_speed_and_within_their_budget():
    assert PRESET_SPEEDS == ("1.5x", "2x", "3x", "4x")
    ts = [999.0 * (1 - i / 50) for i in range(50)]
    for (family, skips), table in PRESETS.items():
        assert list(table) == [n for n in PRESET_SPEEDS if n in table]
        for name, config in table.items():
            units = 14 if family == "latte" else 30
            f = block_compute(config, ts, units, units // 2 if skips else 0, family)
            assert f <= 1 / float(name[:-1]), (family, name, f)


def test_a_speed_gives_its_block_compute_budget():
    assert speed_budget("2x") == pytest.approx(0.475) and speed_budget("1.5x", margin=1.0) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match=r"a speed is a number followed by x, e.g. 1.5x or 3x; got 'fast'"):
        speed_budget("fast")
    with pytest.raises(ValueError, match=r"a speed must be positive, got '0x'"):
        speed_budget("0x")


def test_preset_errors_name_the_model_kind_and_what_exists():
    with pytest.raises(ValueError, match=r"unknown Skip-Cache preset '5x'; presets: 1.5x, 2x, 3x, 4x"):
        preset_config("latte", True, "5x")
    with pytest.raises(ValueError, match=r"no Skip-Cache presets were measured for a DiT with long skips"):
        preset_config("dit", True, "2x")
    assert preset_names("dit", True) == []
