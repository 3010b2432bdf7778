"""benchmarks/peer_caches.py: FBCache, PAB, FasterCache, TaylorSeer, MagCache (diffusers' hooks) and cache-dit's DBCache
on a tiny vanilla Latte."""
import pytest
import torch

pytest.importorskip("diffusers", minversion="0.42")
pytest.importorskip("cache_dit", minversion="1.5")

from helpers import randomize

from benchmarks.peer_caches import METHODS, magcache_ratios, peer_cache
from skipdit_core.models import build_model, make_config
from skipdit_core.pipeline import Request, generate

REQUEST = Request("latte", label=1, frames=4, size=8, sampler="ddim", steps=12, guidance=3.0, seed=5)
SHORT = Request("latte", label=2, frames=4, size=8, sampler="ddim", steps=7, guidance=3.0, seed=9)
DEPTH = 8
ALL_T = (-1, 1000)  # a timestep window holding every step

# Settings that cache as much as the method allows on 12 steps, and settings that never cache.
AGGRESSIVE = {
    "fbcache": dict(threshold=10.0),
    "pab": dict(spatial_skip=3, temporal_skip=3, window=ALL_T),
    "fastercache": dict(uncond_skip=2, attention_skip=2, uncond_window=ALL_T, attention_window=ALL_T),
    "taylorseer": dict(interval=3, order=2, warmup=2),
    "magcache": dict(threshold=10.0, max_skip_steps=2, retention_ratio=0.0, num_inference_steps=12, mag_ratios=[1.0] * 12),
    "cachedit": dict(Fn=1, Bn=1, threshold=10.0, warmup=4, taylorseer_order=1),
}
NEVER = {
    "fbcache": dict(threshold=0.0),
    "pab": dict(spatial_skip=1, temporal_skip=1, window=ALL_T),
    "fastercache": dict(uncond_skip=1, uncond_window=ALL_T, attention_window=ALL_T),
    "taylorseer": dict(interval=1),
    "magcache": dict(max_skip_steps=0, num_inference_steps=12, mag_ratios=[1.0] * 12),
    "cachedit": dict(threshold=0.0, warmup=0),
}
# Attention / MLP calls one 12-step run executes with AGGRESSIVE (of 12 * 8 each), by each method's rule:
EXPECTED_CALLS = {
    "fbcache": (8 + 11 * 2, 8 + 11 * 2),  # step 0 full, then only the head pair (2 blocks)
    "pab": (4 * 8, 12 * 8),  # attention at iterations 0, 3, 6, 9; MLPs always
    "fastercache": (6 * 8, 12 * 8),  # odd steps: uncond skipped, attention extrapolated; MLPs on the cond half
    "taylorseer": (5 * 8, 5 * 8),  # steps 0, 1 (warm-up), then 3, 6, 9
    "magcache": (4 * 8, 4 * 8),  # steps 0, 3, 6, 9: every unit skipped for 2 steps after each computed one
    "cachedit": (4 * 8 + 8 * 4, 4 * 8 + 8 * 4),  # steps 0..3 (warm-up) full, then only the first and last pairs
}


def tiny_vanilla_latte():
    config = make_config("latte", dict(in_channels=3, input_size=8, patch_size=4, num_frames=4, num_classes=4,
                                       depth=DEPTH, hidden_size=32, num_heads=2, skip=False))
    return randomize(build_model("latte", config), seed=3).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_vanilla_latte()


@pytest.fixture(scope="module")
def uncached(model):
    return generate(model, REQUEST).sample


def fingerprint(model):
    """Everything a context could leave behind: module tree, instance attributes, torch hooks, tensors."""
    return [
        (name, type(m), sorted(vars(m)), len(m._forward_pre_hooks), len(m._forward_hooks),
         [(k, id(p)) for k, p in m._parameters.items()])
        for name, m in model.named_modules()
    ], {k: v.clone() for k, v in model.state_dict().items()}


def test_methods_list_their_knobs():
    assert set(METHODS) == {"fbcache", "pab", "fastercache", "taylorseer", "magcache", "cachedit"}
    for method in METHODS:
        assert set(AGGRESSIVE[method]) <= set(METHODS[method]) and set(NEVER[method]) <= set(METHODS[method])


@pytest.mark.parametrize("method", list(METHODS))
def test_aggressive_setting_skips_work_and_changes_the_sample(model, uncached, method):
    with peer_cache(model, method, **AGGRESSIVE[method]) as stats:
        out = generate(model, REQUEST).sample
    assert stats.runs == 1 and stats.forwards == 12
    assert stats.attn_calls_total == stats.mlp_calls_total == 12 * DEPTH
    assert (stats.attn_calls, stats.mlp_calls) == EXPECTED_CALLS[method]
    assert 0 < stats.compute_fraction < 1 and stats.macs < stats.macs_total
    assert torch.isfinite(out).all()
    assert not torch.equal(out, uncached)


@pytest.mark.parametrize("method", list(METHODS))
def test_never_caching_setting_matches_the_uncached_sample(model, uncached, method):
    with peer_cache(model, method, **NEVER[method]) as stats:
        out = generate(model, REQUEST).sample
    assert stats.macs == stats.macs_total and stats.attn_skipped == stats.mlp_skipped == 0
    torch.testing.assert_close(out, uncached, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", list(METHODS))
def test_exit_restores_the_model_exactly(model, uncached, method):
    x = torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([500.0, 500.0]), torch.tensor([1, 4])
    with torch.no_grad():
        before_out = model(x, t, y)
    before = fingerprint(model)
    with peer_cache(model, method, **AGGRESSIVE[method]):
        generate(model, REQUEST)
        assert fingerprint(model)[0] != before[0]  # something was attached
    with pytest.raises(RuntimeError, match="boom"), peer_cache(model, method, **AGGRESSIVE[method]):
        generate(model, SHORT)
        raise RuntimeError("boom")  # restored on an exception too
    after = fingerprint(model)
    assert after[0] == before[0]
    assert after[1].keys() == before[1].keys() and all(torch.equal(after[1][k], before[1][k]) for k in before[1])
    assert not any(hasattr(m, "_diffusers_hook") or "forward" in vars(m) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x, t, y), before_out)
    assert torch.equal(generate(model, REQUEST).sample, uncached)


@pytest.mark.parametrize("method", list(METHODS))
def test_runs_in_one_context_share_no_state(model, method):
    with peer_cache(model, method, **AGGRESSIVE[method]) as fresh:
        first = generate(model, REQUEST).sample
    with peer_cache(model, method, **AGGRESSIVE[method]) as stats:
        a = generate(model, REQUEST).sample
        generate(model, SHORT)  # 7 steps in between: stale counters or caches would shift the schedule
        b = generate(model, REQUEST).sample
    assert torch.equal(a, first) and torch.equal(b, first)
    assert stats.runs == 3 and stats.forwards == 12 + 7 + 12
    assert stats.attn_calls > 2 * fresh.attn_calls  # the statistics accumulate over the runs


def test_fastercache_computes_the_conditional_half_and_approximates_the_other(model):
    """Our batch is [cond, uncond]; diffusers' hook computes the second half: the adapter swaps the halves."""
    seen = []
    handle = model.y_embedder.register_forward_pre_hook(lambda m, args: seen.append(args[0].tolist()))
    x = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([1, 4])
    try:
        with torch.no_grad():
            cond_ref = model(x, torch.tensor([500.0]), torch.tensor([1]))
            with peer_cache(model, "fastercache", uncond_skip=2, attention_skip=1, uncond_window=ALL_T):
                model(torch.cat([x, x]), torch.tensor([999.0, 999.0]), y=y)  # iteration 0: both halves
                out = model(torch.cat([x, x]), torch.tensor([500.0, 500.0]), y=y)  # iteration 1: cond only
    finally:
        handle.remove()
    assert seen[-2:] == [[4, 1], [1]]  # full step in the hook's [uncond, cond] order, then the cond half alone
    torch.testing.assert_close(out[:1], cond_ref, rtol=1e-5, atol=1e-6)  # first half: computed, in place
    assert not torch.allclose(out[1:], out[:1])


def test_fastercache_needs_the_guided_batch(model, uncached):
    with pytest.raises(ValueError, match="guidance > 1"), peer_cache(model, "fastercache"):
        generate(model, Request("latte", label=1, frames=4, size=8, sampler="ddim", steps=3, seed=5))
    assert torch.equal(generate(model, REQUEST).sample, uncached)


def test_fbcache_refuses_a_model_with_long_skips():
    config = make_config("latte", dict(in_channels=3, input_size=8, patch_size=4, num_frames=4, num_classes=4,
                                       depth=DEPTH, hidden_size=32, num_heads=2, skip=True))
    skip_model = build_model("latte", config).eval()
    with pytest.raises(ValueError, match="vanilla"), peer_cache(skip_model, "fbcache"):
        pass
    assert "stack" in vars(skip_model) and type(skip_model.stack).__name__ == "UStack"


def test_unknown_method_or_knob(model):
    with pytest.raises(ValueError, match="unknown peer cache"), peer_cache(model, "teacache"):
        pass
    with pytest.raises(TypeError, match="threshold"), peer_cache(model, "pab", threshold=0.1):
        pass


def test_magcache_ratios_come_from_diffusers_calibration_and_drive_the_skips(model):
    ratios = magcache_ratios(model, REQUEST)
    assert len(ratios) == 12 and ratios[0] == 1.0 and all(r > 0 for r in ratios)
    with peer_cache(model, "magcache", threshold=1e9, max_skip_steps=1, retention_ratio=0.0, num_inference_steps=12,
                    mag_ratios=ratios) as stats:
        generate(model, REQUEST)
    assert stats.attn_calls == 6 * DEPTH  # computed and skipped alternate
    with pytest.raises(ValueError, match="magcache needs the model's mag_ratios"), peer_cache(model, "magcache"):
        pass


def test_cachedit_taylorseer_calibrator_forecasts_the_reused_residual(model, uncached):
    """Same schedule with and without cache-dit's TaylorSeer calibrator; only the reused residual differs."""
    outs, calls = [], []
    for order in (0, 1):
        with peer_cache(model, "cachedit", **{**AGGRESSIVE["cachedit"], "taylorseer_order": order}) as stats:
            outs.append(generate(model, REQUEST).sample)
        calls.append((stats.attn_calls, stats.mlp_calls))
    assert calls[0] == calls[1] == EXPECTED_CALLS["cachedit"]
    assert not torch.equal(outs[0], outs[1])
    with pytest.raises(ValueError, match="leave some of the 4 units"), peer_cache(model, "cachedit", Fn=2, Bn=2):
        pass
