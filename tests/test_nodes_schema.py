"""The node pack without ComfyUI (CI): the adapters' pure logic (nodes/adapters.py, nodes/cache_state.py)
and the pack's structure (entry point, node ids, which modules may import ComfyUI).

The node schemas themselves are built by ComfyUI's `comfy_api` classes; they are checked against a real
ComfyUI through GET /object_info in test_comfyui_integration.py rather than against a fake here.
"""
from __future__ import annotations

import ast
import copy
import importlib.util
import logging
import pathlib
import sys

import pytest
import torch

from helpers import randomize
from nodes import adapters
from nodes.cache_state import STATE_KEY, CacheTarget, SkipCacheSetup, SkipCacheState, current_cut
from skipdit_core import models
from skipdit_core.diffusion import DDIMSampler, Schedule, linear_betas
from skipdit_core.models import UStack
from skipdit_core.skip_cache import SkipCacheConfig, simulate

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMFY_MODULES = {"comfy", "comfy_api", "comfy_extras", "folder_paths", "nodes", "server", "execution", "latent_preview"}
COMFY_FREE = ["__init__.py", "nodes/__init__.py", "nodes/adapters.py", "nodes/cache_state.py", "nodes/branch_patch.py"]


def imported_modules(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


# ----------------------------------------------------------------------------- structure


def test_entry_point_is_v3_only():
    tree = ast.parse((ROOT / "__init__.py").read_text())
    funcs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    assert isinstance(funcs.get("comfy_entrypoint"), ast.AsyncFunctionDef)
    assigned = {t.id for n in ast.walk(tree) if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    assert "NODE_CLASS_MAPPINGS" not in assigned, "a V1 mapping would make ComfyUI ignore comfy_entrypoint"


@pytest.mark.parametrize("rel", COMFY_FREE)
def test_comfy_free_modules_import_no_comfyui(rel):
    bad = {m for m in imported_modules(ROOT / rel) if m.split(".")[0] in COMFY_MODULES}
    assert not bad, f"{rel} imports {bad}"


def test_node_ids_prefixed_unique_and_all_registered():
    ids, classes = [], set()
    for path in (ROOT / "nodes").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(ast.unparse(b) == "io.ComfyNode" for b in node.bases):
                classes.add(node.name)
            if isinstance(node, ast.keyword) and node.arg == "node_id":
                ids.append(node.value.value)
    assert len(ids) == len(classes) == 7 and len(set(ids)) == len(ids)
    assert all(i.startswith("SkipDiT") for i in ids), ids  # never clash with core node ids
    ext = ast.parse((ROOT / "nodes" / "extension.py").read_text())
    (nodes_list,) = [n.value for n in ext.body if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "NODES"]
    assert {e.id for e in nodes_list.elts} == classes


def test_entry_point_makes_skipdit_core_importable_without_leaving_its_folder_on_sys_path():
    spec = importlib.util.spec_from_file_location("skipdit_pack_entry", ROOT / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # imports nothing from ComfyUI
    before = list(sys.path)
    core = module._import_skipdit_core()
    assert core.__name__ == "skipdit_core" and sys.path == before


# ----------------------------------------------------------------------------- schedules and layouts


def test_sampling_settings_are_the_ddpm_linear_schedule():
    for family in adapters.OWN_FAMILIES:
        s = adapters.sampling_settings(family)
        assert s == {"beta_schedule": "sqrt_linear", "linear_start": 1e-4, "linear_end": 0.02}
        assert adapters.PREDICTION[family] == "eps"
        # ComfyUI's "sqrt_linear" is linspace(start, end) (its "linear" squares a linspace of square roots).
        comfy_betas = torch.linspace(s["linear_start"], s["linear_end"], 1000, dtype=torch.float64)
        assert torch.equal(comfy_betas, linear_betas())
    with pytest.raises(ValueError, match="ComfyUI's own model"):
        adapters.sampling_settings("hunyuan")


def _tiny(family, **overrides):
    preset = {"dit": "DiT-tiny", "latte": "Latte-tiny", "latte_t2v": "Latte-T2V-tiny"}[family]
    config = models.make_config(family, {"skip": True, **overrides}, preset=preset)
    return randomize(models.build_model(family, config), seed=3).eval()


@torch.no_grad()
def test_latte_layout_conversion_and_variance_channels():
    model = _tiny("latte")
    x = torch.randn(2, 4, 3, 8, 8)  # ComfyUI: [B, C, T, H, W]
    t, y = torch.tensor([500.0, 500.0]), torch.tensor([1, 5])
    out = adapters.to_comfy_output("latte", model(adapters.to_model_layout("latte", x), t, y), 4)
    ref = model(x.transpose(1, 2), t, y)  # Latte's own (B, F, C, H, W)
    assert out.shape == x.shape
    assert torch.equal(out, ref[:, :, :4].transpose(1, 2))  # epsilon only, back in ComfyUI's layout


@torch.no_grad()
def test_dit_and_latte_t2v_layouts_pass_through():
    dit = _tiny("dit")
    x = torch.randn(1, 4, 8, 8)
    full = dit(x, torch.tensor([10.0]), torch.tensor([2]))
    assert full.shape[1] == 8
    assert torch.equal(adapters.to_comfy_output("dit", full, 4), full[:, :4])
    t2v = _tiny("latte_t2v")
    v = torch.randn(1, 4, 2, 8, 8)
    assert adapters.to_model_layout("latte_t2v", v) is v
    out = t2v(v, torch.tensor([10.0]), torch.randn(1, 5, 32))
    assert adapters.to_comfy_output("latte_t2v", out, 4).shape == v.shape
    with pytest.raises(ValueError, match="video latent"):
        adapters.to_model_layout("latte", torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match="image model"):
        adapters.to_model_layout("dit", v)


def test_class_labels_and_the_null_label():
    y = adapters.resolve_labels([3, adapters.NULL_LABEL], num_classes=10)
    assert y.tolist() == [3, 10] and y.dtype == torch.long
    assert adapters.resolve_labels(adapters.NULL_LABEL, 101, batch=2).tolist() == [101, 101]
    with pytest.raises(ValueError, match=r"classes 0\.\.9"):
        adapters.resolve_labels([10], num_classes=10)
    with pytest.raises(ValueError, match="unconditional"):
        adapters.resolve_labels([0], num_classes=0)


def test_t5_tokens_cut_to_120_keeping_the_end_token():
    seq = [(i, 1.0) for i in range(200)] + [(1, 1.0)]  # 1 = T5's </s>
    tokens = {"t5xxl": [seq, seq[:50]], "meta": "x"}
    out = adapters.truncate_tokens(tokens, 120)
    assert len(out["t5xxl"][0]) == 120 and out["t5xxl"][0][-1] == (1, 1.0) and out["t5xxl"][0][:119] == seq[:119]
    assert out["t5xxl"][1] == seq[:50] and out["meta"] == "x"


def test_frames_and_pixels():
    x = torch.arange(2 * 3 * 4 * 2 * 2, dtype=torch.float32).reshape(2, 3, 4, 2, 2)
    frames = adapters.video_latent_to_frames(x)
    assert frames.shape == (8, 3, 2, 2) and torch.equal(frames[5], x[1, :, 1])  # video 1, frame 1
    images = adapters.pixels_to_images(torch.tensor([-1.0, 0.0, 3.0]).reshape(1, 3, 1, 1))
    assert images.shape == (1, 1, 1, 3) and images.flatten().tolist() == [0.0, 0.5, 1.0]
    with pytest.raises(ValueError, match="connect the VAE"):
        adapters.pixels_to_images(torch.zeros(1, 4, 2, 2))


# ----------------------------------------------------------------------------- pixel space


def test_pixel_range_clamp_and_decode_agree():
    lo, hi = adapters.PIXEL_RANGE
    assert (lo, hi) == (-1.0, 1.0)  # skipdit_core's pixel models (training data, media writers, clip_denoised)
    x0 = torch.tensor([-7.0, -1.0, -0.25, 0.5, 1.0, 40.0]).reshape(1, 3, 2, 1)
    clamped = adapters.clamp_denoised({"denoised": x0, "cond_denoised": None, "sigma": torch.tensor([3.0])})
    assert clamped.flatten().tolist() == [-1.0, -1.0, -0.25, 0.5, 1.0, 1.0]
    # Decode Video Latent maps exactly the clamped range onto IMAGE's 0..1.
    images = adapters.pixels_to_images(clamped)
    assert images.shape == (1, 2, 1, 3) and images.flatten().tolist() == [0.0, 0.375, 1.0, 0.0, 0.75, 1.0]
    assert torch.equal(adapters.pixels_to_images(clamped), adapters.pixels_to_images(x0))


@pytest.mark.parametrize("t, t_prev", [(981, 961), (501, 481), (21, 1), (1, -1)])
def test_euler_on_the_clamped_denoised_is_the_pipelines_clipped_ddim_step(t, t_prev):
    """What the post-CFG clamp gives ComfyUI's ddim / euler samplers (an Euler step in sigma space from the
    denoised x0) is skipdit_core's DDIM step with clip_denoised (x0 clamped, eps re-derived from it)."""
    schedule = Schedule.from_betas(linear_betas(), "eps", learned_range=True)
    ac = schedule.alphas_cumprod
    a, a_prev = float(ac[t]), (float(ac[t_prev]) if t_prev >= 0 else 1.0)
    g = torch.Generator().manual_seed(t)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=g)  # x_t, VP scaling (the pipeline's)
    eps = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=g) * 1.5  # a poor eps: x0 far off at high t
    ddim = DDIMSampler(schedule, [t] + ([t_prev] if t_prev >= 0 else []), clip_denoised=True)
    want = ddim.step(0, torch.cat([eps, torch.zeros_like(eps)], dim=1), x)
    # ComfyUI (EPS, discrete): sigma = sqrt((1 - a) / a), its x = x_t / sqrt(a), denoised = x - sigma * eps.
    sigma, sigma_prev = ((1 - a) / a) ** 0.5, ((1 - a_prev) / a_prev) ** 0.5
    x_ve = x / a ** 0.5
    raw = x_ve - sigma * eps
    denoised = adapters.clamp_denoised({"denoised": raw})
    stepped = denoised + sigma_prev * (x_ve - denoised) / sigma  # k-diffusion's Euler step
    got = stepped * a_prev ** 0.5
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    if t > 500:
        assert (raw.abs() > 1).any()  # the clamp acts here
        unclamped = (raw + sigma_prev * (x_ve - raw) / sigma) * a_prev ** 0.5
        assert not torch.allclose(unclamped, want)


def test_bundled_models_folder_is_the_demos():
    from skipdit_core import demo

    assert adapters.BUNDLED_MODELS_DIR == demo.ASSETS == demo.DEMO_MODEL.parent == demo.VANILLA_TWIN.parent


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_kinds():
    assert adapters.is_comfy_all_in_one(["model.diffusion_model.mlp_t5.0.weight", "vae.x"])
    assert not adapters.is_comfy_all_in_one(["mlp_t5.0.weight"])
    assert adapters.strip_prefix({"model.diffusion_model.a": 1, "vae.b": 2}) == {"a": 1}


def test_which_hunyuan_configs_comfyui_can_hold():
    for name in ("HunyuanDiT-v1.0", "HunyuanDiT-v1.1", "HunyuanDiT-v1.2"):
        assert adapters.core_hunyuan_problems(models.make_config("hunyuan", preset=name)) == [], name
    small = models.make_config("hunyuan", dict(depth=6, hidden_size=128, num_heads=16, mlp_ratio=4.0,
                                               use_style_cond_and_image_meta_size=False))
    assert adapters.core_hunyuan_problems(small) == []
    problems = " ".join(adapters.core_hunyuan_problems(models.make_config("hunyuan", preset="HunyuanDiT-tiny")))
    assert "text_states_dim=32" in problems and "num_heads=4" in problems


def test_core_hunyuan_stack_matches_its_push_pop_loop():
    """ComfyUI's HunYuanDiT loop: block i < depth/2 - 1 pushes its output, block i > depth/2 pops the
    last pushed. The U-stack we cut must pair the same blocks."""
    for depth in (4, 6, 40):
        pushed, pairs = [], []
        for i in range(depth):
            if i > depth // 2:
                pairs.append((pushed.pop(), i))
            if i < depth // 2 - 1:
                pushed.append(i)
        stack = adapters.core_hunyuan_stack(depth)
        assert stack.pairs() == pairs and not pushed
    with pytest.raises(ValueError, match="even depth"):
        adapters.core_hunyuan_stack(5)


# ----------------------------------------------------------------------------- Skip-Cache settings


def test_cache_config_auto_custom_and_percent():
    assert adapters.cache_config("latte", 3, "auto", "timesteps", 0, 0, 9) == SkipCacheConfig(3, 900, 50, 1)
    assert adapters.cache_config("dit", 2, "auto", "timesteps", 0, 0, 1) == SkipCacheConfig(2, 1000, 20, 4)
    assert adapters.cache_config("dit", 2, "auto", "timesteps", 0, 0, 1, max_depth=2).depth == 2  # capped
    assert adapters.cache_config("hunyuan", 2, "custom", "timesteps", 800, 100, 2) == SkipCacheConfig(2, 800, 100, 2)
    damped = adapters.cache_config("latte", 3, "custom", "percent", 0, 100, 1, forecast=1, forecast_damping=0.7)
    assert damped == SkipCacheConfig(3, 1000, 0, 1, forecast=1, forecast_damping=0.7)
    assert adapters.cache_config("latte_t2v", 2, "custom", "percent", 30, 95, 1) == SkipCacheConfig(2, 700, 50, 1)
    with pytest.raises(ValueError, match="0..100"):
        adapters.cache_config("latte", 2, "custom", "percent", 300, 95, 1)
    with pytest.raises(ValueError, match="above its end"):
        adapters.cache_config("latte", 2, "custom", "timesteps", 50, 700, 1)
    # a reversed window in percent is reported in the percent the user typed
    with pytest.raises(ValueError, match=r"start 95% must come before its end 30%"):
        adapters.cache_config("latte", 2, "custom", "percent", 95, 30, 1)


def test_a_depth_that_would_skip_nothing_is_refused_and_auto_never_picks_it():
    """DiT of 8 blocks, 4 long skips: k = 4 runs 4 + 4 = every block on a "cached" step."""
    stack = UStack(8, 4)
    assert stack.max_depth == 3
    with pytest.raises(ValueError, match=r"k=4 skips nothing on this model: .* 8 units, 8 units; k must be in 1\.\.3"):
        stack.check_depth(4)
    stack.check_depth(3)
    assert adapters.cache_config("dit", 2, "auto", "timesteps", 0, 0, 1, max_depth=stack.max_depth).depth == 3
    assert UStack(28, 14).max_depth == 13 and UStack(14, 7).max_depth == 6 and UStack(40, 19).max_depth == 19


def test_latents_of_any_size_are_padded_to_the_patch_and_cropped_back():
    x = torch.arange(2 * 3 * 9 * 7, dtype=torch.float32).reshape(1, 2, 3, 9, 7)  # video, 9 x 7, patch 2
    padded = adapters.pad_to_patch(x, 2)
    assert padded.shape == (1, 2, 3, 10, 8) and torch.equal(padded[..., :9, :7], x)
    assert torch.equal(padded[..., 9, :7], x[..., 0, :])  # circular, as core models pad
    image = torch.randn(1, 4, 1, 1)  # smaller than the patch
    assert adapters.pad_to_patch(image, 2).shape == (1, 4, 2, 2)
    assert adapters.pad_to_patch(torch.randn(1, 4, 8, 8), 2).shape == (1, 4, 8, 8)


# ----------------------------------------------------------------------------- the per-run state

TIMESTEPS = [float(t) for t in range(999, -1, -50)]  # 20 steps, 999 -> 49


def _setup(interval=2, start=700.0, end=50.0, depth=1, units=8, skips=3) -> SkipCacheSetup:
    return SkipCacheSetup(SkipCacheConfig(interval, start, end, depth), CacheTarget("latte", "Latte", UStack(units, skips), 2))


def _state(**kwargs) -> SkipCacheState:
    return _setup(**kwargs).new_run()


def _step(state, key, t, sigma=None, deep=None):
    """One model call: the cut, and a deep state captured on full calls (stands for the model)."""
    cut = state.begin(key, float(t if sigma is None else sigma), t)
    if cut is not None and cut.cached is None:
        cut.captured = deep if deep is not None else torch.full((1,), t)
    state.end(key, cut, 0.01 if cut is None or cut.cached is None else 0.004)
    return cut


def _kinds(cuts):
    return "".join("-" if c is None else ("C" if c.cached is not None else "F") for c in cuts)


def test_one_batch_follows_the_core_rule():
    for n in (2, 3):
        state = _state(interval=n)
        cuts = [_step(state, "both", t) for t in TIMESTEPS]
        expected = simulate(SkipCacheConfig(n, 700.0, 50.0, 1), TIMESTEPS, num_units=8, num_skips=3)
        assert _kinds(cuts) == "".join(expected.schedule)
        assert state.steps.cached_steps == expected.cached_steps > 0
        assert state.calls == 20 and state.blocks_uncached == 20 * 8 * 2
        assert state.blocks_run == (expected.full_steps * 8 + expected.cached_steps * 2) * 2


def test_separate_cond_and_uncond_batches_decide_alike_and_cache_apart():
    state = _state()
    cond, uncond = [], []
    for t in TIMESTEPS:
        cond.append(_step(state, "cond", t, deep=torch.full((1,), t)))
        uncond.append(_step(state, "uncond", t, deep=torch.full((1,), -t)))
    assert _kinds(cond) == _kinds(uncond) and "C" in _kinds(cond)
    for c, u in zip(cond, uncond):
        if c.cached is not None:
            assert float(c.cached) == -float(u.cached) > 0  # each composition reuses its own deep state
    assert state.steps.steps == 20 and len(state.tracks) == 2


def test_repeated_sigma_is_one_step():
    """Heun-like: evaluations at sigma_i, sigma_{i+1}, sigma_{i+1}, sigma_{i+2}, ... count once per sigma."""
    plain, heun = _state(), _state()
    ref = [_step(plain, "k", t) for t in TIMESTEPS]
    cuts = []
    for i, t in enumerate(TIMESTEPS):
        cuts.append(_step(heun, "k", t))
        if i + 1 < len(TIMESTEPS):
            cuts.append(_step(heun, "k", TIMESTEPS[i + 1]))  # the corrector's call at the next sigma
    firsts = [cuts[0]] + cuts[1::2]  # the first call at each sigma
    assert _kinds(firsts) == _kinds(ref)
    assert heun.steps.steps == 20 and heun.calls == 39
    repeats = cuts[2::2]  # the second call at each sigma repeats the decision of the first ...
    assert _kinds(repeats)[:-1] == _kinds(cuts[1::2][: len(repeats)])[:-1]
    # ... except after the window's end dropped the cache (t = 49 <= 50): then it runs in full.
    assert _kinds(cuts[-2:]) == "CF"


def test_interval_one_never_cuts():
    state = _state(interval=1)
    assert {_step(state, "k", t) for t in TIMESTEPS} == {None}
    assert state.blocks_run == state.blocks_uncached
    assert "n=1 caches nothing" in state.summary()[1]


def test_runs_clones_and_abort_leave_no_stale_state():
    """The settings are all a patched model holds; each run starts empty, under either copy semantics
    of ModelPatcher.clone(): ComfyUI 0.3.64 deep-copies transformer_options, 0.38 copies its dicts
    and lists only and shares every other object."""
    setup = _setup()
    state = setup.new_run()
    for t in TIMESTEPS[:5]:
        _step(state, "k", t)
    state.begin("k", 0.5, 400.0)
    assert state.current_cut is not None and current_cut(setup) is state.current_cut
    state.abort()  # an interrupted call
    assert state.current_cut is None and current_cut(setup) is None
    options = {"transformer_options": {STATE_KEY: setup, "patches_replace": {"dit": {}}}}
    deep = copy.deepcopy(options)  # 0.3.64
    shallow = {"transformer_options": dict(options["transformer_options"])}  # 0.38: the object is shared
    for copied in (deep, shallow):
        again = copied["transformer_options"][STATE_KEY]
        assert again is setup  # immutable settings: sharing them is harmless
        run = again.new_run()
        assert run is not state and run.tracks == {} and run.steps is None
        assert _kinds([_step(run, "k", t) for t in TIMESTEPS[:3]]) == "FFF"  # starts afresh: t >= 700
    assert len(state.tracks) == 1 and state.steps.steps == 6  # the first run is untouched by the others


def _threaded(fn, n):
    """Run fn(i) in n threads that start together; their results in order."""
    import threading

    barrier, out, errors = threading.Barrier(n), [None] * n, []

    def body(i):
        try:
            barrier.wait()
            out[i] = fn(i)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return out


def test_device_threads_of_one_run_keep_their_own_cuts_and_caches():
    """MultiGPU CFG Split (0.38): cond and uncond on two devices, each in its own thread, same run.
    Every thread sees its own cut while the others run; decisions are the same on every device and
    equal to one-after-the-other calls; each device caches its own deep state; one set of stats."""
    import time

    TS = TIMESTEPS[:12]
    sequential = _state()
    for t in TS:
        for key in ("cond@cuda:0", "uncond@cuda:1"):
            _step(sequential, key, t, deep=torch.full((1,), t if key.startswith("cond") else -t))
    setup = _setup()
    state = setup.new_run()

    def device(i):
        key, sign = (("cond@cuda:0", 1.0), ("uncond@cuda:1", -1.0))[i]
        seen = []
        for t in TS:
            cut = state.begin(key, t, t)
            time.sleep(0.002)  # the other thread begins its call meanwhile
            assert current_cut(setup) is cut and state.current_cut is cut  # not the other thread's
            if cut is not None and cut.cached is None:
                cut.captured = torch.full((1,), sign * t)
            seen.append(cut)
            state.end(key, cut, 0.01)
        return seen

    cond, uncond = _threaded(device, 2)
    assert _kinds(cond) == _kinds(uncond) == "".join(sequential.tracks["cond@cuda:0"].run.stats.schedule)
    for c, u in zip(cond, uncond):
        if c.cached is not None:
            assert float(c.cached) == -float(u.cached) > 0  # each device feeds its own cached tensor
    assert state.calls == sequential.calls == 24 and state.blocks_run == sequential.blocks_run
    assert len(state.tracks) == 2 and current_cut(setup) is None


def test_summary_reports_and_warns():
    state = _state()
    for t in TIMESTEPS:
        _step(state, "k", t)
    level, msg = state.summary()
    assert level == logging.INFO
    s = state.steps
    assert f"{s.full_steps} full + {s.cached_steps} cached of 20 steps" in msg and "measured speedup" in msg
    # medians: full calls 0.01 s, cached 0.004 s
    expected = 20 * 0.01 / (s.full_steps * 0.01 + s.cached_steps * 0.004)
    assert state.measured_speedup() == pytest.approx(expected)
    assert "interrupted after" in state.summary(outcome="interrupted")[1]
    assert "failed after" in state.summary(outcome="failed")[1]  # an error is not an interruption
    assert "(together with easycache: the figures below are of both)" in state.summary(others=["easycache"])[1]
    never = _state(start=100.0, end=50.0)
    for t in TIMESTEPS[:10]:  # all steps at t >= 549: above the window's start
        _step(never, "k", t)
    level, msg = never.summary()
    assert level == logging.WARNING and "no step was cached" in msg
    assert "no model call" in _state().summary()[1]


def test_depth_is_checked_against_the_model():
    with pytest.raises(ValueError, match=r"k must be in 1\.\.3"):
        _state(depth=4)


@pytest.mark.parametrize("family,strict", [("latte", True), ("latte_t2v", False), ("dit", False), ("hunyuan", False)])
def test_node_state_follows_the_familys_window_end_rule(family, strict):
    """A sampler step that lands on t = end: Latte class-to-video keeps the cache past it (t < end)."""
    config = SkipCacheConfig(interval=2, start=1000, end=50)
    state = SkipCacheSetup(config, CacheTarget(family, family, UStack(6, 3))).new_run()
    kinds = []
    for i, t in enumerate([900, 800, 50, 40, 30]):
        cut = state.begin("batch", sigma=float(10 - i), timestep=float(t))
        if cut is not None and cut.cached is None:
            cut.captured = torch.zeros(1)
        kinds.append("C" if cut is not None and cut.cached is not None else "F")
        state.end("batch", cut, 0.0)
    assert "".join(kinds) == ("FCFCF" if strict else "FCFFF")


def test_cache_config_carries_empty_steps_and_warmup_in_every_form():
    for settings, unit in (("auto", "timesteps"), ("custom", "timesteps"), ("custom", "percent")):
        c = adapters.cache_config("latte", 3, settings, unit, 0 if unit == "percent" else 1000, 100 if unit == "percent" else 0,
                                  1, forecast=1, forecast_damping=0.7, empty_steps=1, forecast_warmup=True)
        assert (c.empty_steps, c.forecast_warmup, c.forecast, c.forecast_damping) == (1, True, 1, 0.7)
    with pytest.raises(ValueError, match=r"empty steps must be an integer in 0..n-1 = 0..1"):
        adapters.cache_config("latte", 2, "auto", "timesteps", 0, 0, 1, empty_steps=2)
