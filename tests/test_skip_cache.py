"""Skip-Cache: the rule, its schedule, and its effect on real (tiny) models of every family."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers import randomize

from skipdit_core.diffusion import make_sampler
from skipdit_core.models import make_config, build_model
from skipdit_core.models.ustack import UStack
from skipdit_core.skip_cache import AUTHORS_SETTINGS, SkipCacheConfig, SkipCacheRun, simulate


def tiny(family: str, **overrides):
    preset = {"dit": "DiT-tiny", "latte": "Latte-tiny", "latte_t2v": "Latte-T2V-tiny", "hunyuan": "HunyuanDiT-tiny"}[family]
    skip = {} if family == "hunyuan" else {"skip": True}
    torch.manual_seed(0)
    return randomize(build_model(family, make_config(family, {**skip, **overrides}, preset=preset)), seed=1).eval()


def inputs(family: str, model, batch: int = 2):
    g = torch.Generator().manual_seed(2)
    c = model.config
    if family == "dit":
        return dict(x=torch.randn(batch, 4, 8, 8, generator=g), y=torch.tensor([1, c.num_classes])[:batch])
    if family == "latte":
        return dict(x=torch.randn(batch, 3, 4, 8, 8, generator=g), y=torch.tensor([1, c.num_classes])[:batch])
    if family == "latte_t2v":
        return dict(
            x=torch.randn(batch, 4, 3, 8, 8, generator=g),
            encoder_hidden_states=torch.randn(batch, 5, c.caption_channels, generator=g),
        )
    return dict(
        x=torch.randn(batch, 4, 8, 8, generator=g),
        encoder_hidden_states=torch.randn(batch, c.text_len, c.text_states_dim, generator=g),
        text_embedding_mask=torch.ones(batch, c.text_len, dtype=torch.long),
        encoder_hidden_states_t5=torch.randn(batch, c.text_len_t5, c.text_states_dim_t5, generator=g),
        text_embedding_mask_t5=torch.ones(batch, c.text_len_t5, dtype=torch.long),
        image_meta_size=torch.tensor([[64.0, 64, 64, 64, 0, 0]] * batch),
    )


FAMILIES = ["dit", "latte", "latte_t2v", "hunyuan"]
TIMESTEPS = [980, 900, 800, 700, 600, 500, 400, 300, 200, 100, 40, 0]


def run_loop(model, inp, config=None, timesteps=TIMESTEPS, record=None):
    """A toy denoising loop: the model output (first input channels) nudges x at each step."""
    x = inp["x"].clone()
    rest = {k: v for k, v in inp.items() if k != "x"}
    run = SkipCacheRun.for_model(config, model) if config else None
    with torch.no_grad():
        for t in timesteps:
            cut = run.begin_step(t) if run else None
            out = model(x, torch.full((x.shape[0],), float(t)), **rest, cut=cut)
            if run:
                run.end_step(cut)
            channel_dim = 2 if model.family == "latte" else 1
            x = x - 0.1 * out.narrow(channel_dim, 0, x.shape[channel_dim])
    return x, run


@pytest.mark.parametrize("family", FAMILIES)
def test_interval_one_is_bit_identical(family):
    model = tiny(family)
    inp = inputs(family, model)
    plain, _ = run_loop(model, inp)
    same, run = run_loop(model, inp, SkipCacheConfig(interval=1, start=1000, end=0))
    assert torch.equal(plain, same)
    assert run.stats.cached_steps == 0 and run.stats.full_steps == len(TIMESTEPS)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_steps_run_only_the_end_units(family):
    model = tiny(family)
    inp = inputs(family, model)
    blocks = model.blocks if family in ("dit", "hunyuan") else None
    calls = []
    if family == "latte_t2v":
        for i, b in enumerate(model.transformer_blocks):
            b.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
    elif family == "latte":
        for i, b in enumerate(model.blocks[0::2]):  # spatial block of pair i
            b.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
    else:
        for i, b in enumerate(blocks):
            b.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
    L = model.stack.num_units
    k = 1
    per_step = []
    config = SkipCacheConfig(interval=2, start=1000, end=0, depth=k)
    run = SkipCacheRun.for_model(config, model)
    x = inp["x"]
    rest = {kk: v for kk, v in inp.items() if kk != "x"}
    with torch.no_grad():
        for t in (900, 800, 700, 600):
            calls.clear()
            cut = run.begin_step(t)
            model(x, torch.full((x.shape[0],), float(t)), **rest, cut=cut)
            run.end_step(cut)
            per_step.append(list(calls))
    assert run.stats.schedule == ["F", "C", "F", "C"]
    assert per_step[0] == list(range(L)) and per_step[2] == list(range(L))
    assert per_step[1] == per_step[3] == [*range(k), *range(L - k, L)]
    bpu = getattr(model, "blocks_per_unit", 1)
    assert run.stats.blocks_run == (2 * L + 2 * 2 * k) * bpu
    assert run.stats.blocks_uncached == 4 * L * bpu


def test_cached_step_fuses_fresh_shallow_outputs_with_the_cached_state():
    """With the same inputs twice, a cached step reproduces the full step exactly: the deep state
    it reuses is the one the full step computed, and the shallow units are recomputed."""
    model = tiny("dit", depth=6)
    inp = inputs("dit", model)
    run = SkipCacheRun.for_model(SkipCacheConfig(interval=2, start=1000, end=0, depth=2), model)
    t = torch.full((2,), 500.0)
    with torch.no_grad():
        cut = run.begin_step(500)
        full = model(inp["x"], t, inp["y"], cut=cut)
        run.end_step(cut)
        cut = run.begin_step(500)
        assert cut.cached is not None
        cached = model(inp["x"], t, inp["y"], cut=cut)
        # a different shallow input changes the cached step's output: the shallow path is live
        cut2 = run.begin_step(500)  # counter 2: full again
        assert cut2.cached is None
    assert torch.equal(full, cached)


def test_state_does_not_leak_between_runs():
    model = tiny("dit")
    inp = inputs("dit", model)
    config = SkipCacheConfig(interval=3, start=1000, end=0)
    first, run1 = run_loop(model, inp, config)
    other = dict(inp, x=torch.randn_like(inp["x"]))
    run_loop(model, other, config)
    again, run2 = run_loop(model, inp, config)
    assert torch.equal(first, again)
    assert run1.stats.schedule == run2.stats.schedule and run1.stats.cached_steps > 0


def test_window_schedule_and_reset():
    stats = simulate(SkipCacheConfig(interval=2, start=700, end=50), TIMESTEPS)
    # full at t >= 700; the counter counts from the first step, so 600 (step 4) is full;
    # 40 (step 10, counter even) is full and resets; 0 is full after the reset.
    assert "".join(stats.schedule) == "FFFFF" + "CFCFC" + "FF"
    assert (stats.full_steps, stats.cached_steps) == (9, 3)
    assert stats.speedup_bound(1, 28) == pytest.approx(1 / (9 / 12 + 3 / 12 * 2 / 28))


def test_first_step_past_the_end_may_be_cached_then_all_full():
    stats = simulate(SkipCacheConfig(interval=2, start=700, end=50), [800, 600, 45, 40, 30, 20])
    assert "".join(stats.schedule) == "FCFFFF"
    stats = simulate(SkipCacheConfig(interval=3, start=700, end=50), [800, 600, 45, 40, 30, 20])
    assert "".join(stats.schedule) == "FCCFFF"  # 45 is cached, then the reset


# The timesteps the authors' samplers give the model (skip-cache.md; their released code):
T2V_DDIM50 = [20 * (49 - i) for i in range(50)]  # diffusers DDIM, "leading", offset 0
DDPM250 = [round(i * 999 / 249) for i in range(250)][::-1]  # improved-diffusion respacing
HUNYUAN_DDPM100 = [10 * (99 - i) + 1 for i in range(100)]  # diffusers DDPM, "leading", offset 1


@pytest.mark.parametrize(
    "timesteps,config,units,skips,expected",
    [
        (T2V_DDIM50, AUTHORS_SETTINGS["latte_t2v"], 28, 14, {2: (33, 17), 3: (28, 22), 4: (25, 25)}),
        (DDPM250, AUTHORS_SETTINGS["latte"], 14, 7, {2: (143, 107), 3: (108, 142), 4: (90, 160), 5: (80, 170), 6: (72, 178)}),
        (DDPM250, AUTHORS_SETTINGS["dit"], 28, 14, {2: (128, 122), 3: (87, 163), 4: (67, 183), 5: (54, 196), 6: (46, 204)}),
        (HUNYUAN_DDPM100, AUTHORS_SETTINGS["hunyuan"], 40, 19, {2: (67, 33), 3: (56, 44), 4: (50, 50)}),
    ],
    ids=["latte_t2v-ddim50", "latte-ddpm250", "dit-ddpm250", "hunyuan-ddpm100"],
)
def test_authors_schedules(timesteps, config, units, skips, expected):
    """Full/cached counts of the authors' code (the paper reports 33/17 and 143/107 for n = 2)."""
    for n, counts in expected.items():
        stats = simulate(replace(config, interval=n), timesteps, units, skips)
        assert (stats.full_steps, stats.cached_steps) == counts, n


def test_percent_form():
    c = SkipCacheConfig.from_percent(0.3, 0.95, interval=3, depth=2)
    assert (c.start, c.end, c.interval, c.depth) == (700, 50, 3, 2)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(interval=0), "interval n must be an integer >= 1"),
        (dict(interval=2.5), "interval n must be an integer >= 1"),
        (dict(depth=0), "depth k must be an integer >= 1"),
        (dict(start=50, end=700), "must be above its end"),
        (dict(start=1200), "start must be a timestep in 0..1000"),
    ],
)
def test_invalid_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SkipCacheConfig(**kwargs)


def test_depth_out_of_range_and_vanilla_models():
    with pytest.raises(ValueError, match=r"k=15 is out of range for this model: it has 14 long skips, so k must be in 1..13"):
        SkipCacheRun(SkipCacheConfig(depth=15), UStack(28, 14))
    with pytest.raises(ValueError, match=r"k=14 skips nothing on this model: .* its 28 units, 28 units; k must be in 1..13"):
        SkipCacheRun(SkipCacheConfig(depth=14), UStack(28, 14))  # custom k = 14 on DiT-XL: every block runs
    # a model without long skips: any k with 2k < L (the first k units' work reaches the output through the residual)
    assert UStack(28, 0).max_depth == 13
    SkipCacheRun(SkipCacheConfig(depth=13, reuse="residual"), UStack(28, 0))
    with pytest.raises(ValueError, match=r"k=14 skips nothing on this model"):
        SkipCacheRun(SkipCacheConfig(depth=14), UStack(28, 0))
    with pytest.raises(ValueError, match="percent must be in 0..1"):
        SkipCacheConfig.from_percent(30, 95)


def authors_schedule(timesteps, n, start, end, strict_end):
    """The authors' released loop, replayed: full when the cache is empty, the counter is a multiple
    of n or t >= start; the counter advances every step; the cache is dropped and the counter reset
    after a step with t < end (their Latte class-to-video code) or t <= end (Latte T2V, DiT, Hunyuan-DiT)."""
    cache, counter, out = None, 0, []
    for t in timesteps:
        full = cache is None or counter % n == 0 or t >= start
        out.append("F" if full else "C")
        if full:
            cache = t
        counter += 1
        if t < end or (not strict_end and t == end):
            cache, counter = None, 0
    return "".join(out)


# DDPM 100 (improved-diffusion respacing) lands on t = 50 and t = 20, the authors' window ends.
DDPM100 = make_sampler("latte", "ddpm", 100).timesteps


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n", [2, 3, 4])
def test_window_end_rule_per_family_on_a_schedule_that_lands_on_the_end(family, n):
    assert 50 in DDPM100 and 20 in DDPM100
    config = replace(AUTHORS_SETTINGS[family], interval=n)
    units, skips = (14, 7) if family.startswith("latte") else (28, 14)
    stats = simulate(config, DDPM100, units, skips, family=family)
    expected = authors_schedule(DDPM100, n, config.start, config.end, strict_end=family == "latte")
    assert "".join(stats.schedule) == expected


def test_latte_class_to_video_keeps_one_more_cached_step_at_t_equal_end():
    """Where the two boundaries differ: after the step at t = 50 the authors' class-to-video code
    keeps the cache (t < 50 is false) and the next step (t = 40) may be cached."""
    config = replace(AUTHORS_SETTINGS["latte"], interval=2)
    strict = "".join(simulate(config, DDPM100, 14, 7, family="latte").schedule)
    inclusive = "".join(simulate(config, DDPM100, 14, 7, family="latte_t2v").schedule)
    i = DDPM100.index(40)
    assert strict[:i] == inclusive[:i]
    assert (strict[i], inclusive[i]) == ("C", "F")
    assert strict.count("C") == inclusive.count("C") + 1


def test_a_models_run_follows_its_familys_end_rule():
    for family in FAMILIES:
        run = SkipCacheRun.for_model(replace(AUTHORS_SETTINGS[family], depth=1), tiny(family))
        assert run.end_inclusive == (family != "latte"), family


# --------------------------------------------------------------------------- forecasting the cut state

from skipdit_core.skip_cache import CutForecast  # noqa: E402


@pytest.mark.parametrize("order", [1, 2])
def test_forecast_is_exact_on_polynomials_of_its_order_and_uses_order_plus_one_states(order):
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(3))
    poly = lambda t: a + b * t / 1000 + (c * (t / 1000) ** 2 if order == 2 else 0)  # noqa: E731
    f = CutForecast(order)
    for t in (980.0, 900.0, 860.0, 700.0, 660.0):  # uneven spacing, as real schedules
        f.add(t, poly(t))
        assert len(f) <= order + 1
    assert len(f) == order + 1 and f.latest.dtype == torch.float64
    for t in (640.0, 500.0):
        assert torch.allclose(f.predict(t).double(), poly(t), rtol=1e-5, atol=1e-6)
    f.clear()
    assert f.latest is None


def test_forecast_with_fewer_full_steps_than_its_order_drops_to_what_they_allow():
    f = CutForecast(2)
    h0 = torch.tensor([1.0, 2.0])
    f.add(900.0, h0)
    assert f.predict(800.0) is h0  # one state: reuse
    f.add(800.0, torch.tensor([2.0, 4.0]))
    assert torch.allclose(f.predict(700.0), torch.tensor([3.0, 6.0]))  # two states: a line
    z = CutForecast(0)
    z.add(900.0, h0)
    z.add(800.0, torch.tensor([5.0, 5.0]))
    assert len(z) == 1 and torch.equal(z.predict(100.0), torch.tensor([5.0, 5.0]))


@pytest.mark.parametrize("family", FAMILIES)
def test_forecast_zero_feeds_the_full_steps_own_tensor_and_decisions_never_depend_on_the_order(family):
    model = tiny(family)
    inp = inputs(family, model)
    reuse, run0 = run_loop(model, inp, SkipCacheConfig(interval=2, start=1000, end=0))
    schedules = {0: run0.stats.schedule}
    outs = {0: reuse}
    for order in (1, 2):
        outs[order], run = run_loop(model, inp, SkipCacheConfig(interval=2, start=1000, end=0, forecast=order))
        schedules[order] = run.stats.schedule
        assert torch.isfinite(outs[order]).all()
    assert schedules[0] == schedules[1] == schedules[2]
    assert not torch.equal(outs[1], reuse) and not torch.equal(outs[2], outs[1])
    # order 0: the cached step is fed the very tensor the last full step captured (the paper's reuse)
    run = SkipCacheRun.for_model(SkipCacheConfig(interval=2, start=1000, end=0), model)
    x = inp["x"]
    rest = {k: v for k, v in inp.items() if k != "x"}
    with torch.no_grad():
        cut = run.begin_step(900)
        model(x, torch.full((x.shape[0],), 900.0), **rest, cut=cut)
        run.end_step(cut)
        assert run.begin_step(800).cached is cut.captured
    # n = 1 with a forecast is still the uncached model
    plain, _ = run_loop(model, inp)
    same, _ = run_loop(model, inp, SkipCacheConfig(interval=1, start=1000, end=0, forecast=2))
    assert torch.equal(plain, same)


def test_forecast_follows_a_cut_state_that_moves_linearly_in_t():
    """A stand-in stack whose cut state is a line in t: order 1 feeds the cached step the exact state
    of its timestep, reuse feeds a stale one."""
    stack = UStack(4, 2)
    for order, exact in ((0, False), (1, True), (2, True)):
        run = SkipCacheRun(SkipCacheConfig(interval=3, start=1000, end=0, forecast=order), stack)
        fed = {}
        for t in (950.0, 900.0, 850.0, 800.0, 750.0, 700.0, 650.0):
            cut = run.begin_step(t)
            state = torch.full((2,), 3.0 + t / 100)
            if cut.cached is None:
                cut.captured = state
            else:
                fed[t] = bool(torch.allclose(cut.cached, state))
            run.end_step(cut)
        assert run.stats.schedule == ["F", "C", "C", "F", "C", "C", "F"]
        # the first cached steps follow a single full step (nothing to extrapolate from yet)
        assert fed == {900.0: False, 850.0: False, 750.0: exact, 700.0: exact}, order


def test_forecast_damping_moves_the_forecast_toward_the_last_full_state():
    """damping d feeds h0 + d (p(t) - h0): 1 is the polynomial itself, 0 the last full state (reuse)."""
    states = {900.0: torch.tensor([1.0, 2.0]), 800.0: torch.tensor([2.0, 4.0])}
    plain, damped, none = CutForecast(1), CutForecast(1, 0.7), CutForecast(1, 0.0)
    for f in (plain, damped, none):
        for t, h in states.items():
            f.add(t, h)
    assert torch.allclose(plain.predict(700.0), torch.tensor([3.0, 6.0]))
    assert torch.allclose(damped.predict(700.0), torch.tensor([2.7, 5.4]))
    assert torch.equal(none.predict(700.0), states[800.0])


@pytest.mark.parametrize("family", FAMILIES)
def test_forecast_damping_zero_is_reuse_and_one_is_the_plain_forecast(family):
    model = tiny(family)
    inp = inputs(family, model)
    config = SkipCacheConfig(interval=3, start=1000, end=0)
    reuse, _ = run_loop(model, inp, config)
    zero, _ = run_loop(model, inp, replace(config, forecast=1, forecast_damping=0.0))
    assert torch.equal(zero, reuse)
    plain, _ = run_loop(model, inp, replace(config, forecast=2))
    one, _ = run_loop(model, inp, replace(config, forecast=2, forecast_damping=1.0))
    half, _ = run_loop(model, inp, replace(config, forecast=2, forecast_damping=0.5))
    assert torch.equal(one, plain) and not torch.equal(half, plain) and not torch.equal(half, reuse)


def test_forecast_setting_is_checked_and_named():
    with pytest.raises(ValueError, match=r"forecast damping must be in 0..1"):
        SkipCacheConfig(forecast=1, forecast_damping=1.5)
    assert SkipCacheConfig(interval=3, forecast=1, forecast_damping=0.7).describe() == "n=3 700->50 k=1 forecast=1 damping=0.7"
    with pytest.raises(ValueError, match=r"forecast must be one of \(0, 1, 2\)"):
        SkipCacheConfig(forecast=3)
    assert SkipCacheConfig(interval=3, forecast=2).describe() == "n=3 700->50 k=1 forecast=2"
    assert SkipCacheConfig(interval=3).describe() == "n=3 700->50 k=1"
    assert SkipCacheConfig.from_percent(0.3, 0.95, 2, 1, forecast=1).forecast == 1


def test_torch_compile_keeps_two_stable_graphs_full_and_cached():
    """torch.compile(model) (CPU inductor) over a Skip-Cache run with a forecast: one graph for the full
    steps (capturing the cut state), one for the cached ones, no recompilation after the first of each."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = tiny("dit", depth=4, hidden_size=32, num_heads=2)
    inp = inputs("dit", model)
    compiled = torch.compile(model)
    config = SkipCacheConfig(interval=2, start=1000, end=0, forecast=1)
    eager, _ = run_loop(model, inp, config, timesteps=TIMESTEPS)
    run = SkipCacheRun.for_model(config, model)
    x = inp["x"].clone()
    graphs = []
    with torch.no_grad():
        for t in TIMESTEPS:
            cut = run.begin_step(t)
            out = compiled(x, torch.full((2,), float(t)), inp["y"], cut=cut)
            run.end_step(cut)
            x = x - 0.1 * out.narrow(1, 0, x.shape[1])
            graphs.append(counters["stats"]["unique_graphs"])
    assert run.stats.schedule[:4] == ["F", "C", "F", "C"]
    assert graphs[1] == graphs[-1] == 2  # full + cached, compiled once each
    assert torch.allclose(x, eager, atol=1e-4)


# ----------------------------------------------------------------------------- empty steps, forecast warm-up


def test_empty_steps_are_the_last_of_each_interval_and_run_no_unit():
    stats = simulate(SkipCacheConfig(interval=4, start=1000, end=0, forecast=1, empty_steps=2), range(950, 0, -50))
    assert "".join(stats.schedule) == "FCEEFCEEFCEEFCEEFCE"
    assert stats.empty_steps == 9 and stats.cached_steps == 14 and stats.full_steps == 5
    L = 28  # simulate's default stack: 28 units, cached steps 2 of them, empty ones none
    assert stats.blocks_run == 5 * L + 5 * 2
    assert stats.speedup_bound(1, L) == pytest.approx(stats.blocks_uncached / stats.blocks_run)
    assert "(9 of them empty)" in stats.summary()
    # m = n - 1: every cached step is empty; m = 0: the rule of the paper
    assert "".join(simulate(SkipCacheConfig(interval=3, start=1000, end=0, empty_steps=2), range(900, 0, -100)).schedule) == "FEEFEEFEE"
    assert simulate(SkipCacheConfig(interval=3, start=1000, end=0), range(900, 0, -100)).schedule == list("FCCFCCFCC")


@pytest.mark.parametrize("family", FAMILIES)
def test_an_empty_step_runs_no_block_and_hands_on_the_forecast_output(family):
    """An empty step's output is the final layer (at its own timestep) of the forecast stack output: with
    forecast 0, of the last full step's stack output itself."""
    model = tiny(family)
    inp = inputs(family, model)
    x, rest = inp["x"], {k: v for k, v in inp.items() if k != "x"}
    blocks = model.transformer_blocks if family == "latte_t2v" else model.blocks
    calls = []
    for b in blocks:
        b.register_forward_hook(lambda m, a, o: calls.append(1))
    run = SkipCacheRun.for_model(SkipCacheConfig(interval=2, start=1000, end=0, empty_steps=1), model)
    with torch.no_grad():
        full = run.begin_step(900)
        model(x, torch.full((x.shape[0],), 900.0), **rest, cut=full)
        run.end_step(full)
        calls.clear()
        empty = run.begin_step(800)
        assert empty.kind == "empty" and empty.output is full.captured_output
        out = model(x, torch.full((x.shape[0],), 800.0), **rest, cut=empty)
        run.end_step(empty)
        assert calls == [] and run.stats.schedule == ["F", "E"]
        # the same output from a run whose stack returns that tensor for every input
        original = model.stack.run
        model.stack.run = lambda h, *a, **k: full.captured_output
        try:
            assert torch.equal(out, model(torch.zeros_like(x), torch.full((x.shape[0],), 800.0), **rest))
        finally:
            model.stack.run = original
    with_empty, _ = run_loop(model, inp, SkipCacheConfig(interval=3, start=1000, end=0, forecast=1, empty_steps=1))
    without, _ = run_loop(model, inp, SkipCacheConfig(interval=3, start=1000, end=0, forecast=1))
    assert torch.isfinite(with_empty).all() and not torch.equal(with_empty, without)


def test_empty_step_forecasts_the_output_from_the_full_steps():
    """A stand-in stack whose output is a line in t: order 1 hands the empty step the exact output of its
    timestep, from the full steps' outputs only."""
    stack = UStack(4, 2)
    run = SkipCacheRun(SkipCacheConfig(interval=3, start=1000, end=0, forecast=1, empty_steps=1), stack)
    handed = {}
    for t in (900.0, 800.0, 700.0, 600.0, 500.0, 400.0, 300.0):
        cut = run.begin_step(t)
        out = torch.full((2,), 1.0 + t / 100)
        if cut.kind == "full":
            cut.captured, cut.captured_output = torch.zeros(2), out
        elif cut.kind == "empty":
            handed[t] = bool(torch.allclose(cut.output, out))
        run.end_step(cut)
    assert run.stats.schedule == list("FCEFCEF")
    assert handed == {700.0: False, 400.0: True}  # after one full step there is no line yet: its output reused


def test_forecast_warmup_runs_full_until_the_forecast_has_its_points_then_counts_the_interval_again():
    steps = range(950, 0, -50)
    plain = simulate(SkipCacheConfig(interval=3, start=1000, end=0, forecast=2), steps)
    warm = simulate(SkipCacheConfig(interval=3, start=1000, end=0, forecast=2, forecast_warmup=True), steps)
    assert "".join(plain.schedule) == "FCCFCCFCCFCCFCCFCCF"
    assert "".join(warm.schedule) == "FFFCCFCCFCCFCCFCCFC"  # 3 full steps for order 2, the interval from the third
    empty = simulate(SkipCacheConfig(interval=2, start=1000, end=0, forecast=1, empty_steps=1, forecast_warmup=True), steps)
    assert "".join(empty.schedule) == "FFEFEFEFEFEFEFEFEFE"
    # forecast 0 needs one full step, the first: the warm-up changes nothing
    assert simulate(SkipCacheConfig(interval=3, start=1000, end=0, forecast_warmup=True), steps).schedule == \
        simulate(SkipCacheConfig(interval=3, start=1000, end=0), steps).schedule


@pytest.mark.parametrize("family", FAMILIES)
def test_warmup_and_empty_steps_leave_the_papers_rule_and_n_one_untouched(family):
    model = tiny(family)
    inp = inputs(family, model)
    paper, _ = run_loop(model, inp, SkipCacheConfig(interval=2, start=1000, end=0))
    warm, _ = run_loop(model, inp, SkipCacheConfig(interval=2, start=1000, end=0, forecast_warmup=True))
    assert torch.equal(paper, warm)
    plain, _ = run_loop(model, inp)
    same, _ = run_loop(model, inp, SkipCacheConfig(interval=1, start=1000, end=0, forecast=1, forecast_warmup=True))
    assert torch.equal(plain, same)


def test_repeated_evaluation_of_a_step_keeps_its_decision_and_a_repeated_full_state_refreshes_the_newest():
    stack = UStack(4, 2)
    run = SkipCacheRun(SkipCacheConfig(interval=3, start=1000, end=0, forecast=1, empty_steps=1), stack)
    for t, value in ((900.0, 1.0), (800.0, 2.0)):  # two full steps (warm-up off: 800 is cached)
        cut = run.begin_step(t)
        if cut.kind == "full":
            cut.captured = cut.captured_output = torch.full((2,), value)
        run.end_step(cut)
    assert run.stats.schedule == ["F", "C"]
    again = run.repeat_step()
    assert again.kind == "cached" and again.cached is run.current
    run.end_step(again)
    empty = run.begin_step(700.0)
    assert empty.kind == "empty" and run.repeat_step().output is empty.output
    # a sampler evaluating a full step twice (Heun's corrector): the second state at the same timestep
    # replaces the newest one, no division by a zero step
    f = CutForecast(1)
    f.add(900.0, torch.tensor([1.0]))
    f.add(800.0, torch.tensor([2.0]))
    f.add(800.0, torch.tensor([3.0]))
    assert f.ts == [800.0] and len(f) == 2 and torch.equal(f.latest, torch.tensor([3.0]))
    assert torch.isfinite(f.predict(700.0)).all() and torch.allclose(f.predict(700.0), torch.tensor([4.0]))


@pytest.mark.parametrize("kwargs, message", [
    (dict(interval=2, empty_steps=2), r"empty steps must be an integer in 0..n-1 = 0..1"),
    (dict(interval=1, empty_steps=1), r"empty steps must be an integer in 0..n-1 = 0..0"),
    (dict(interval=3, empty_steps=-1), r"empty steps"),
    (dict(interval=3, forecast_warmup=1), r"forecast warmup must be True or False"),
])
def test_empty_steps_and_warmup_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SkipCacheConfig(**kwargs)


def test_empty_steps_and_warmup_are_named():
    config = SkipCacheConfig(interval=3, start=1000, end=0, forecast=1, forecast_damping=0.7, empty_steps=1, forecast_warmup=True)
    assert config.describe() == "n=3 1000->0 k=1 forecast=1 damping=0.7 empty=1 warmup"
    assert SkipCacheConfig.from_percent(0.0, 1.0, 3, 1, empty_steps=2).empty_steps == 2


def test_residual_reuse_on_a_stack_without_long_skips():
    """Units as `h -> h + f_i(h)`: a full run captures h_{L-k} - h_k; a cached run on the same input reproduces
    the full run's output (up to rounding); with another input it adds the old residual to its own h_k, unlike
    the state reuse, which discards the first k units' work on a stack without long skips."""
    stack = UStack(6, 0)
    weights = [torch.randn(4, 4, generator=torch.Generator().manual_seed(i)) * 0.3 for i in range(6)]
    run_unit = lambda i, h: h + torch.tanh(h @ weights[i])  # noqa: E731
    fuse = lambda j, h, skip: pytest.fail("no long skips to fuse")  # noqa: E731
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(9))
    for reuse in ("residual", "state"):
        run = SkipCacheRun(SkipCacheConfig(interval=2, start=1000, end=0, depth=2, reuse=reuse), stack)
        full_cut = run.begin_step(900)
        assert full_cut.residual == (reuse == "residual")
        full = stack.run(x, run_unit, fuse, full_cut)
        h = x
        for i in range(4):
            h = run_unit(i, h)
        h2 = run_unit(1, run_unit(0, x))
        expected_capture = h - h2 if reuse == "residual" else h
        torch.testing.assert_close(full_cut.captured, expected_capture, rtol=0, atol=0)
        assert full_cut.entry is None
        run.end_step(full_cut)
        cached_cut = run.begin_step(800)
        assert cached_cut.kind == "cached"
        torch.testing.assert_close(stack.run(x, run_unit, fuse, cached_cut), full, rtol=1e-6, atol=1e-6)
        run.end_step(cached_cut)
        other = x * 1.5
        again = SkipCacheRun(SkipCacheConfig(interval=2, start=1000, end=0, depth=2, reuse=reuse), stack)
        cut = again.begin_step(900)
        stack.run(x, run_unit, fuse, cut)
        again.end_step(cut)
        cut = again.begin_step(800)
        out = stack.run(other, run_unit, fuse, cut)
        h2_other = run_unit(1, run_unit(0, other))
        middle = h2_other + (h - h2) if reuse == "residual" else h
        torch.testing.assert_close(out, run_unit(5, run_unit(4, middle)), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"reuse must be one of \('state', 'residual'\)"):
        SkipCacheConfig(reuse="deep")
    assert SkipCacheConfig(reuse="residual").describe().endswith(" residual")
