"""`skipdit analyze`: per-unit feature dynamics along a trajectory, the suggested Skip-Cache settings, the heatmap."""
import math
import re

import pytest
import torch

from helpers import randomize

from skipdit_core.analyze import FeatureDynamics, record_dynamics, suggest, token_cosine
from skipdit_core.cli import main
from skipdit_core.loading import save_safetensors
from skipdit_core.models import build_model, make_config
from skipdit_core.pipeline import Request, generate


def tiny_latte(skip: bool):
    config = make_config("latte", dict(in_channels=3, input_size=8, patch_size=4, num_frames=4, num_classes=4, depth=8,
                                       hidden_size=32, num_heads=2, skip=skip))
    return randomize(build_model("latte", config), seed=3).eval(), config


REQUEST = Request("latte", label=1, frames=4, size=8, sampler="ddim", steps=12, guidance=3.0, seed=5)


def test_token_cosine():
    a = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    assert token_cosine(a, a) == pytest.approx(1.0)
    assert token_cosine(a, torch.tensor([[[0.0, 1.0], [0.0, -1.0]]])) == pytest.approx(-0.5)  # (0 + -1) / 2


def test_record_dynamics_matches_the_unit_outputs_of_a_plain_run():
    model, _ = tiny_latte(skip=True)
    dyn = record_dynamics(model, REQUEST, max_lag=3)
    assert model.stack.observers == []  # the recorder removes itself
    assert dyn.similarity.shape == (3, 4, 12) and len(dyn.timesteps) == 12 and dyn.num_skips == 2
    assert dyn.timesteps == sorted(dyn.timesteps, reverse=True)
    for lag in (1, 2, 3):
        assert dyn.similarity[lag - 1, :, :lag].isnan().all() and not dyn.similarity[lag - 1, :, lag:].isnan().any()

    # Independently: keep every unit output of the same run and compare two entries by hand.
    outputs = {}
    model.stack.observers.append(lambda i, h: outputs.setdefault(i, []).append(h.clone()))
    try:
        plain = generate(model, REQUEST)
    finally:
        model.stack.observers.clear()
    assert len(outputs[2]) == 12
    for unit, step, lag in ((2, 7, 2), (0, 1, 1), (3, 11, 3)):
        expected = token_cosine(outputs[unit][step], outputs[unit][step - lag])
        assert dyn.similarity[lag - 1, unit, step].item() == pytest.approx(expected, abs=1e-6)
    # Recording does not change the sample.
    again = generate(model, REQUEST)
    assert torch.equal(plain.sample, again.sample)


def synthetic(lag1: list[float], lag2: float, lag3: float, num_skips: int = 3) -> FeatureDynamics:
    """Dynamics of a 6-unit stack whose reused unit (4 at k=1) has the given lag-1 row; lags 2 and 3 constant."""
    steps = len(lag1)
    sim = torch.full((3, 6, steps), 0.5)
    sim[0, 4] = torch.tensor(lag1)
    sim[1, 4], sim[2, 4] = lag2, lag3
    for lag in (1, 2, 3):
        sim[lag - 1, :, :lag] = math.nan
    timesteps = [round(999 - i * 999 / (steps - 1)) for i in range(steps)]
    return FeatureDynamics(timesteps, sim, num_skips, 0.0)


def test_suggest_takes_the_longest_smooth_run_and_the_longest_safe_reuse():
    lag1 = [math.nan] + [0.90] * 4 + [0.99] * 12 + [0.90] * 2 + [0.99] * 3  # runs: steps 5..16 and 19..21
    dyn = synthetic(lag1, lag2=0.97, lag3=0.93)
    tip = suggest(dyn, threshold=0.95)
    assert (tip.start, tip.end) == (dyn.timesteps[4], dyn.timesteps[16])
    assert tip.interval == 3 and tip.window_similarity == pytest.approx(0.97)  # lag 2 passes, lag 3 does not
    assert tip.stats.cached_steps > 0 and tip.speedup_bound > 1.0
    assert tip.config.interval == 3
    # A stricter threshold shortens the reuse; one nothing meets gives no suggestion.
    assert suggest(dyn, threshold=0.98).interval == 2
    assert suggest(dyn, threshold=0.995) is None
    # No long skips (a vanilla twin): Skip-Cache cannot run, nothing to suggest.
    assert suggest(synthetic(lag1, 0.97, 0.93, num_skips=0)) is None
    with pytest.raises(ValueError, match="depth k=4 is out of range"):
        suggest(dyn, depth=4)


def test_analyze_command_writes_the_heatmap_and_prints_settings(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    paths = []
    for skip in (True, False):
        model, config = tiny_latte(skip)
        paths.append(tmp_path / f"{'skip' if skip else 'vanilla'}.safetensors")
        save_safetensors(model.state_dict(), paths[-1], "latte", config)
    png = tmp_path / "out" / "dynamics.png"
    code = main(["analyze", str(paths[0]), "--twin", str(paths[1]), "--label", "2", "--steps", "10",
                 "--guidance", "3", "--threshold", "0.5", "-o", str(png), "--speed", "2x", "--classes", "1", "2",
                 "--seeds", "0", "1"])
    assert code == 0
    out = capsys.readouterr().out
    assert "4 units, 2 long skips, 10 ddim steps" in out and "4 units, 0 long skips" in out
    # the suggestion is chosen on classes x seeds (4 trajectories), within 0.95 / 2 of the block compute
    assert "on 4 trajectories (classes [1, 2] x seeds [0, 1])" in out, out
    found = re.search(r"suggested Skip-Cache: (.*): (\d+)% of the block compute .* over (\d) trajectories", out)
    assert found and int(found.group(2)) <= 47 and found.group(3) == "4", out
    assert "skipdit sample ... --cache-interval" in out and "ComfyUI Apply Skip-Cache (settings custom)" in out
    assert ("the presets on the same 4 trajectories" in out) or ("no presets exist" in out)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_the_recorded_sample_is_the_uncached_output_compare_forecasts_reuses():
    from skipdit_core.analyze import compare_forecasts, record_dynamics
    from skipdit_core.pipeline import Request, generate
    from skipdit_core.skip_cache import SkipCacheConfig

    model, _ = tiny_latte(True)
    req = Request("latte", label=1, frames=4, size=8, sampler="ddim", steps=8, guidance=3.0)
    dyn = record_dynamics(model, req)
    assert torch.equal(dyn.sample, generate(model, req).sample)  # the observer changes nothing
    config = SkipCacheConfig(interval=2, start=1000, end=0)
    assert compare_forecasts(model, req, config, reference=dyn.sample) == compare_forecasts(model, req, config)


def test_compare_dampings_replays_the_forecast_at_each_damping():
    from skipdit_core.analyze import compare_dampings, compare_forecasts
    from skipdit_core.skip_cache import SkipCacheConfig

    model, _ = tiny_latte(True)
    req = Request("latte", label=1, frames=4, size=8, sampler="ddim", steps=10, guidance=3.0, seed=1)
    config = SkipCacheConfig(interval=3, start=1000, end=0, forecast=1)
    scores = compare_dampings(model, req, config, dampings=(1.0, 0.5, 0.0))
    assert list(scores) == [1.0, 0.5, 0.0]
    assert scores[1.0] == compare_forecasts(model, req, config, orders=(1,))[1]  # damping 1: the plain forecast
    assert scores[0.0] == compare_forecasts(model, req, config, orders=(0,))[0]  # damping 0: the paper's reuse
    with pytest.raises(ValueError, match="only acts on a forecast"):
        compare_dampings(model, req, SkipCacheConfig(interval=3))
