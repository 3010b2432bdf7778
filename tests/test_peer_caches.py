"""benchmarks/peer_caches.py: FBCache, PAB, FasterCache, TaylorSeer, MagCache (diffusers' hooks), cache-dit's DBCache
and Spectrum (ours) on a tiny vanilla Latte and a tiny Wan."""
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
    "spectrum": dict(warmup=2, interval=3, grow=0.5, order=2, history=4, ridge=0.1),
}
NEVER = {
    "fbcache": dict(threshold=0.0),
    "pab": dict(spatial_skip=1, temporal_skip=1, window=ALL_T),
    "fastercache": dict(uncond_skip=1, uncond_window=ALL_T, attention_window=ALL_T),
    "taylorseer": dict(interval=1),
    "magcache": dict(max_skip_steps=0, num_inference_steps=12, mag_ratios=[1.0] * 12),
    "cachedit": dict(threshold=0.0, warmup=0),
    "spectrum": dict(interval=1),
}
# Attention / MLP calls one 12-step run executes with AGGRESSIVE (of 12 * 8 each), by each method's rule:
EXPECTED_CALLS = {
    "fbcache": (8 + 11 * 2, 8 + 11 * 2),  # step 0 full, then only the head pair (2 blocks)
    "pab": (4 * 8, 12 * 8),  # attention at iterations 0, 3, 6, 9; MLPs always
    "fastercache": (6 * 8, 12 * 8),  # odd steps: uncond skipped, attention extrapolated; MLPs on the cond half
    "taylorseer": (5 * 8, 5 * 8),  # steps 0, 1 (warm-up), then 3, 6, 9
    "magcache": (4 * 8, 4 * 8),  # steps 0, 3, 6, 9: every unit skipped for 2 steps after each computed one
    "cachedit": (4 * 8 + 8 * 4, 4 * 8 + 8 * 4),  # steps 0..3 (warm-up) full, then only the first and last pairs
    "spectrum": (5 * 8, 5 * 8),  # steps 0, 1 (warm-up), 4, 7 (window 3, then 3.5), 11 (window 4); no unit otherwise
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
    assert set(METHODS) == {"fbcache", "pab", "fastercache", "taylorseer", "magcache", "cachedit", "spectrum"}
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


def test_cachedit_foca_and_dmd_calibrators_forecast_the_reused_residual(model):
    """cache-dit's FoCa and DMD calibrators: the same schedule as plain reuse, another reused residual."""
    outs = {}
    for calibrator in ("none", "foca", "dmd"):
        settings = {**AGGRESSIVE["cachedit"], "taylorseer_order": 0, "calibrator": calibrator}
        with peer_cache(model, "cachedit", **settings) as stats:
            outs[calibrator] = generate(model, REQUEST).sample
        assert (stats.attn_calls, stats.mlp_calls) == EXPECTED_CALLS["cachedit"]
        assert torch.isfinite(outs[calibrator]).all()
    assert not torch.equal(outs["foca"], outs["none"]) and not torch.equal(outs["dmd"], outs["none"])
    with pytest.raises(ValueError, match="taylorseer_order is the taylorseer calibrator's"), \
            peer_cache(model, "cachedit", calibrator="foca", taylorseer_order=1):
        pass
    with pytest.raises(ValueError, match="calibrator is one of"), peer_cache(model, "cachedit", calibrator="teacache"):
        pass


# ------------------------------------------------------------------------------------------------- Wan

WAN_LAYERS = 6
WAN_STEPS = 10
WAN_TEXT = {"prompt_embeds": torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(2))}
WAN_REQUEST = Request("wan", text=WAN_TEXT, frames=2, size=8, steps=WAN_STEPS, guidance=3.0, seed=5)
WAN_SHORT = Request("wan", text=WAN_TEXT, frames=2, size=8, steps=6, guidance=3.0, seed=7)
WAN_METHODS = [m for m in METHODS if m not in ("pab", "fastercache")]
WAN_AGGRESSIVE = {
    "fbcache": dict(threshold=10.0),
    "taylorseer": dict(interval=3, order=2, warmup=2),
    "magcache": dict(threshold=10.0, max_skip_steps=2, retention_ratio=0.0, num_inference_steps=WAN_STEPS,
                     mag_ratios=[1.0] * WAN_STEPS),
    "cachedit": dict(Fn=1, Bn=1, threshold=10.0, warmup=4, taylorseer_order=1),
    "spectrum": dict(warmup=2, interval=3, grow=0.0, order=2, history=4, ridge=0.1),
}
WAN_NEVER = {
    "fbcache": dict(threshold=0.0),
    "taylorseer": dict(interval=1),
    "magcache": dict(max_skip_steps=0, num_inference_steps=WAN_STEPS, mag_ratios=[1.0] * WAN_STEPS),
    "cachedit": dict(threshold=0.0, warmup=0),
    "spectrum": dict(interval=1),
}
# Feed-forwards (one per block) one 10-step run executes with WAN_AGGRESSIVE (of 10 * 6), by each method's rule:
WAN_FFN_RUNS = {
    "fbcache": 6 + 9 * 1,  # step 0 full, then only the head block
    "taylorseer": 5 * 6,  # steps 0, 1 (warm-up), then 3, 6, 9
    "magcache": 4 * 6,  # steps 0, 3, 6, 9
    "cachedit": 4 * 6 + 6 * 2,  # steps 0..3 (warm-up) full, then the first and last blocks
    "spectrum": 4 * 6,  # steps 0, 1 (warm-up), 4, 7; no block otherwise
}


def tiny_wan(num_skips=0):
    config = make_config("wan", dict(dim=32, ffn_dim=64, num_layers=WAN_LAYERS, num_heads=2, text_dim=16, text_len=4,
                                     freq_dim=32, in_channels=3, out_channels=3, num_skips=num_skips))
    return randomize(build_model("wan", config), seed=4).eval()


@pytest.fixture(scope="module")
def wan():
    return tiny_wan()


@pytest.fixture(scope="module")
def wan_uncached(wan):
    return generate(wan, WAN_REQUEST).sample


class Runs:
    """Counts executions of our modules (hooks on them, attached before any context, so adapters do not hide them)."""

    def __init__(self, modules):
        self.calls = []
        self.handles = [m.register_forward_pre_hook(lambda *_: self.calls.append(1)) for m in modules]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def test_wan_methods_list():
    assert set(WAN_METHODS) == set(WAN_AGGRESSIVE) == set(WAN_NEVER) == set(WAN_FFN_RUNS)


@pytest.mark.parametrize("method", WAN_METHODS)
def test_wan_aggressive_setting_skips_work_in_proportion(wan, wan_uncached, method):
    with Runs([b.ffn for b in wan.blocks]) as ffn, peer_cache(wan, method, **WAN_AGGRESSIVE[method]) as stats:
        out = generate(wan, WAN_REQUEST).sample
    total = WAN_STEPS * WAN_LAYERS
    assert stats.runs == 1 and stats.forwards == WAN_STEPS
    assert stats.attn_calls_total == 2 * total and stats.mlp_calls_total == total  # self- and cross-attention
    assert len(ffn.calls) == stats.mlp_calls == WAN_FFN_RUNS[method] and stats.attn_calls == 2 * stats.mlp_calls
    assert stats.compute_fraction == pytest.approx(WAN_FFN_RUNS[method] / total, rel=1e-12)  # blocks cost alike
    assert torch.isfinite(out).all() and not torch.equal(out, wan_uncached)


@pytest.mark.parametrize("method", WAN_METHODS)
def test_wan_never_caching_setting_matches_the_uncached_sample(wan, wan_uncached, method):
    with peer_cache(wan, method, **WAN_NEVER[method]) as stats:
        out = generate(wan, WAN_REQUEST).sample
    assert stats.macs == stats.macs_total and stats.compute_fraction == 1
    assert stats.attn_skipped == stats.mlp_skipped == 0
    if method == "spectrum":
        assert torch.equal(out, wan_uncached)  # interval 1: the real stack at every step, bit for bit
    else:
        torch.testing.assert_close(out, wan_uncached, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", WAN_METHODS)
def test_wan_exit_restores_the_model_exactly(wan, wan_uncached, method):
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 3, 2, 8, 8, generator=g), torch.randn(2, 4, 16, generator=g)
    t = torch.tensor([500.0, 500.0])
    with torch.no_grad():
        before_out = wan(x, t, text)
    before = fingerprint(wan)
    with peer_cache(wan, method, **WAN_AGGRESSIVE[method]):
        generate(wan, WAN_REQUEST)
        assert fingerprint(wan)[0] != before[0]
    with pytest.raises(RuntimeError, match="boom"), peer_cache(wan, method, **WAN_AGGRESSIVE[method]):
        generate(wan, WAN_SHORT)
        raise RuntimeError("boom")
    after = fingerprint(wan)
    assert after[0] == before[0]
    assert after[1].keys() == before[1].keys() and all(torch.equal(after[1][k], before[1][k]) for k in before[1])
    assert not any(hasattr(m, "_diffusers_hook") or "forward" in vars(m) for m in wan.modules())
    with torch.no_grad():
        assert torch.equal(wan(x, t, text), before_out)
    assert torch.equal(generate(wan, WAN_REQUEST).sample, wan_uncached)


@pytest.mark.parametrize("method", WAN_METHODS)
def test_wan_runs_in_one_context_share_no_state(wan, method):
    with peer_cache(wan, method, **WAN_AGGRESSIVE[method]):
        first = generate(wan, WAN_REQUEST).sample
    with peer_cache(wan, method, **WAN_AGGRESSIVE[method]) as stats:
        a = generate(wan, WAN_REQUEST).sample
        generate(wan, WAN_SHORT)
        b = generate(wan, WAN_REQUEST).sample
    assert torch.equal(a, first) and torch.equal(b, first)
    assert stats.runs == 3 and stats.forwards == 2 * WAN_STEPS + 6


@pytest.mark.parametrize("method", ["pab", "fastercache"])
def test_latte_only_methods_refuse_wan(wan, wan_uncached, method):
    before = fingerprint(wan)[0]
    with pytest.raises(ValueError, match=rf"^{method} applies to a Latte model only .* family is wan$"), \
            peer_cache(wan, method):
        pass
    assert fingerprint(wan)[0] == before


def test_wan_macs_match_a_flop_count(wan):
    """Our Wan MAC formulas against torch's FLOP counter (math attention, so its matmuls are counted too)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    g = torch.Generator().manual_seed(1)
    x, text, t = torch.randn(2, 3, 2, 8, 8, generator=g), torch.randn(2, 3, 16, generator=g), torch.tensor([700.0] * 2)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        wan(x, t, text)  # 3 text tokens, padded to text_len = 4 by the model
    flops = sum(sum(c.values()) for name, c in counter.get_flop_counts().items()
                if name.startswith("WanModel.blocks.") and name.count(".") == 2)
    with torch.no_grad(), peer_cache(wan, "spectrum", interval=1) as stats:
        wan(x, t, text)
    assert 2 * stats.macs_total == 2 * stats.macs == flops


def test_wan_magcache_ratios(wan):
    ratios = magcache_ratios(wan, WAN_REQUEST)
    assert len(ratios) == WAN_STEPS and ratios[0] == 1.0 and all(r > 0 for r in ratios)


def test_wan_cachedit_calibrators(wan, wan_uncached):
    for calibrator in ("foca", "dmd"):
        settings = {**WAN_AGGRESSIVE["cachedit"], "taylorseer_order": 0, "calibrator": calibrator}
        with Runs([b.ffn for b in wan.blocks]) as ffn, peer_cache(wan, "cachedit", **settings) as stats:
            out = generate(wan, WAN_REQUEST).sample
        assert len(ffn.calls) == WAN_FFN_RUNS["cachedit"] and stats.compute_fraction < 1
        assert torch.isfinite(out).all() and not torch.equal(out, wan_uncached)


# -------------------------------------------------------------------------------------------- Spectrum


def test_spectrum_fit_reproduces_a_polynomial_of_degree_up_to_its_order():
    from benchmarks.peer_caches import spectrum_weights

    g = torch.Generator().manual_seed(0)
    coeffs = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)  # a cubic in tau, per feature of a (3, 5) tensor
    feature = lambda tau: sum(c * tau**j for j, c in enumerate(coeffs))  # noqa: E731
    taus = [0.9, 0.7, 0.55, 0.3, 0.1, -0.2]  # full steps, t decreasing
    for order in (3, 4):
        for target in (0.0, -0.5, -1.0):  # inside, and far beyond, the fitted points
            w = spectrum_weights(taus, target, order, ridge=0.0)
            forecast = sum(wk * feature(tk) for wk, tk in zip(w.tolist(), taus))
            torch.testing.assert_close(forecast, feature(target), rtol=0, atol=1e-9)
    w = spectrum_weights(taus, -1.0, 2, ridge=0.0)  # a quadratic fit cannot follow a cubic
    assert not torch.allclose(sum(wk * feature(tk) for wk, tk in zip(w.tolist(), taus)), feature(-1.0), atol=1e-3)
    w = spectrum_weights(taus, -0.5, 3, ridge=0.1)  # the ridge shrinks the coefficients: no longer exact
    assert not torch.allclose(sum(wk * feature(tk) for wk, tk in zip(w.tolist(), taus)), feature(-0.5), atol=1e-6)
    assert spectrum_weights(taus[:2], 0.0, 4, ridge=0.0).shape == (2,)  # fewer points than coefficients: min-norm


def test_spectrum_cached_step_runs_no_unit_and_forecasts_the_stack_output(wan):
    """Full steps run every block; a cached step runs none, and the head receives the Chebyshev forecast of the
    stack outputs remembered at the full steps."""
    from benchmarks.peer_caches import spectrum_weights, timestep_tau

    steps, head_inputs, blocks_per_call = [], [], []

    def new_call(module, args):
        steps.append(float(args[1].reshape(-1)[0]))
        blocks_per_call.append(0)

    hooks = [wan.register_forward_pre_hook(new_call),
             wan.head.register_forward_pre_hook(lambda m, a: head_inputs.append(a[0].clone()))]
    hooks += [b.register_forward_pre_hook(lambda m, a: blocks_per_call.__setitem__(-1, blocks_per_call[-1] + 1))
              for b in wan.blocks]
    settings = WAN_AGGRESSIVE["spectrum"]
    try:
        with peer_cache(wan, "spectrum", **settings):
            generate(wan, WAN_REQUEST)
    finally:
        for h in hooks:
            h.remove()
    full = [0, 1, 4, 7]
    assert blocks_per_call == [WAN_LAYERS if i in full else 0 for i in range(WAN_STEPS)]
    for i in range(WAN_STEPS):
        if i in full:
            continue
        past = [k for k in full if k < i][-settings["history"]:]
        w = spectrum_weights([timestep_tau(steps[k]) for k in past], timestep_tau(steps[i]), settings["order"],
                             settings["ridge"])
        expected = sum(wk * head_inputs[k] for wk, k in zip(w.tolist(), past))
        torch.testing.assert_close(head_inputs[i], expected, rtol=1e-5, atol=1e-6)


def test_spectrum_schedule_grows_its_window(wan):
    """The authors' schedule: warm-up, then windows of floor(N + j * alpha) steps, a full step ending each."""
    calls, full = [], []
    hooks = [wan.register_forward_pre_hook(lambda m, a: calls.append(len(calls))),
             wan.blocks[0].register_forward_pre_hook(lambda m, a: full.append(calls[-1]))]
    try:
        with peer_cache(wan, "spectrum") as stats:  # defaults: warm-up 5, N = 2, alpha = 0.75
            generate(wan, Request("wan", text=WAN_TEXT, frames=2, size=8, steps=50, seed=1))
    finally:
        for h in hooks:
            h.remove()
    assert full == [0, 1, 2, 3, 4, 6, 8, 11, 15, 20, 25, 31, 38, 46]  # 14 network evaluations of 50
    assert stats.compute_fraction == pytest.approx(14 / 50, rel=1e-12)


@pytest.mark.parametrize("family", ["latte", "wan"])
def test_spectrum_on_a_model_with_long_skips(family):
    if family == "latte":
        config = make_config("latte", dict(in_channels=3, input_size=8, patch_size=4, num_frames=4, num_classes=4,
                                           depth=DEPTH, hidden_size=32, num_heads=2, skip=True))
        skip_model, req, units = randomize(build_model("latte", config), seed=3).eval(), REQUEST, DEPTH // 2
    else:
        skip_model, req, units = tiny_wan(num_skips=2), WAN_REQUEST, WAN_LAYERS
    assert skip_model.stack.num_skips
    uncached = generate(skip_model, req).sample
    with peer_cache(skip_model, "spectrum", interval=1) as stats:
        same = generate(skip_model, req).sample
    assert torch.equal(same, uncached) and stats.compute_fraction == 1
    with peer_cache(skip_model, "spectrum", warmup=2, interval=3, grow=0.0, order=2, history=4) as stats:
        out = generate(skip_model, req).sample
    full = len([i for i in range(req.steps) if i < 2 or (i - 1) % 3 == 0])  # 0, 1, 4, 7, (10)
    assert stats.mlp_calls == full * units * (2 if family == "latte" else 1)
    assert torch.isfinite(out).all() and not torch.equal(out, uncached)
    with pytest.raises(ValueError, match="fbcache runs on a vanilla model"), peer_cache(skip_model, "fbcache"):
        pass


def test_spectrum_knobs_and_cut(wan):
    from skipdit_core.models import StackCut

    with pytest.raises(ValueError, match="history > order"), peer_cache(wan, "spectrum", order=4, history=4):
        pass
    x, text, t = torch.zeros(1, 3, 2, 8, 8), torch.zeros(1, 4, 16), torch.tensor([500.0])
    with pytest.raises(ValueError, match="no Skip-Cache cut"), torch.no_grad(), peer_cache(wan, "spectrum"):
        wan(x, t, text, cut=StackCut(depth=1))
