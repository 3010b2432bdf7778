"""The bundled demo model and its vanilla twin (skipdit_core/assets/), and the main job run on them."""
import os

import pytest
import torch
from test_demo import centroid, colour_of, shape_of

from skipdit_core.cli import main
from skipdit_core.demo import DEMO_MODEL, SHAPE_CLASSES, VANILLA_TWIN, run_demo
from skipdit_core.loading import inspect_checkpoint, load_model
from skipdit_core.media import read_video
from skipdit_core.pipeline import Request, generate, to_frames


def test_bundled_models_are_small_twins():
    skip, vanilla = inspect_checkpoint(DEMO_MODEL), inspect_checkpoint(VANILLA_TWIN)
    assert skip.family == vanilla.family == "latte"
    assert skip.config.skip and not vanilla.config.skip
    for field in ("depth", "hidden_size", "num_heads", "patch_size", "in_channels", "num_frames", "num_classes",
                  "input_size", "prediction", "learn_sigma"):
        assert getattr(skip.config, field) == getattr(vanilla.config, field), field
    assert skip.config.num_classes == len(SHAPE_CLASSES) and skip.config.in_channels == 3
    assert os.path.getsize(DEMO_MODEL) < 8e6 and os.path.getsize(VANILLA_TWIN) < 8e6


# Shapes read right by tests/test_demo.shape_of when shipped: skip 8 of 8, vanilla twin 5 of 8 (same recipe
# and budget; its triangles and crosses come out ragged). The rule reads 93% of 16 px training clips right.
DEEP = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "models")
DEEP_SKIP, DEEP_VANILLA = os.path.join(DEEP, "deep-skip-latte.safetensors"), os.path.join(DEEP, "deep-latte-vanilla.safetensors")


def test_benchmark_twins_have_latte_xl_depth_and_differ_only_in_the_skips():
    skip, vanilla = inspect_checkpoint(DEEP_SKIP), inspect_checkpoint(DEEP_VANILLA)
    assert skip.config.depth == vanilla.config.depth == 28 and skip.config.num_skips == 7
    assert skip.config.skip and not vanilla.config.skip
    assert {k: v for k, v in vars(skip.config).items() if k != "skip"} == {k: v for k, v in vars(vanilla.config).items() if k != "skip"}


# Shapes read right when the benchmark twins were taken at step 8,000 (docs/deep-twins.md): skip 4 of 8, vanilla 2.
@pytest.mark.parametrize("path,min_shapes", [(DEMO_MODEL, 6), (VANILLA_TWIN, 4), (DEEP_SKIP, 3), (DEEP_VANILLA, 1)],
                         ids=["skip", "vanilla", "deep-skip", "deep-vanilla"])
def test_demo_models_draw_moving_shapes_of_the_requested_class(path, min_shapes):
    """Two seeds per class with the main job's sampler (DDIM 50, guidance 4): the shape of the requested
    class in its colour, moving."""
    model, _ = load_model(path)
    size = model.config.input_size
    shapes = colours = moving = 0
    for label in range(len(SHAPE_CLASSES)):
        for seed in (0, 1):
            req = Request("latte", label=label, frames=8, size=size, sampler="ddim", steps=50, guidance=4.0, seed=seed)
            frames = to_frames("latte", generate(model, req).sample)
            shapes += shape_of(frames) == SHAPE_CLASSES[label]
            colours += colour_of(frames) == SHAPE_CLASSES[label]
            moving += float((centroid(frames[0]) - centroid(frames[-1])).norm()) > 1.0
    assert colours == 8, f"{colours} of 8 samples in the requested class's colour"
    assert shapes >= min_shapes, f"only {shapes} of 8 samples show the requested shape"
    assert moving >= 6, f"only {moving} of 8 samples move"


def test_main_job_on_the_bundled_model(tmp_path, capsys):
    assert main(["demo", "--class", "square", "--steps", "20", "--repeats", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "speedup" in out and "PSNR" in out and "cached of 20 steps" in out
    a = read_video(str(tmp_path / "demo-square-seed0-uncached.mp4"))
    b = read_video(str(tmp_path / "demo-square-seed0-cached.mp4"))
    assert a.shape == b.shape == (8, 128, 128, 3)


def test_skip_cache_on_the_bundled_model_stays_close(tmp_path):
    r = run_demo(str(tmp_path), "cross", repeats=1)
    assert "cached of 50 steps" in r.summary and not r.summary.startswith("50 full")
    assert 25 < r.psnr < float("inf") and r.ssim > 0.9  # close, but the cache did change something
    assert r.speedup_bound > 1.0


WAN_SHAPES = os.path.join(DEEP, "wan-shapes.safetensors")


def test_the_trained_wan_draws_its_classes_in_their_colours():
    """The trained Wan of docs/wan-shapes.md (step 3,000 of training/configs/wan-shapes.yaml), two seeds per class,
    Euler 50, guidance 4, its classes' fixed prompt embeddings: the colour of every sample is the requested class's.
    At 8 x 8 px the rule of tests/test_demo.py reads the shape right in 4 of 8 and sees motion (a centroid moving by
    more than a pixel over the 8 frames) in 3 of 8 when it was taken; below those, the model has changed."""
    from skipdit_core.shape_prompts import class_text

    model, ckpt = load_model(WAN_SHAPES)
    assert ckpt.family == "wan" and model.stack.num_units == 30 and model.stack.num_skips == 0
    c = model.config
    shapes = colours = moving = 0
    for label in range(len(SHAPE_CLASSES)):
        for seed in (0, 1):
            req = Request("wan", text=class_text(label, c.text_len, c.text_dim), frames=8, size=8, steps=50,
                          guidance=4.0, seed=seed)
            frames = to_frames("wan", generate(model, req).sample)
            shapes += shape_of(frames) == SHAPE_CLASSES[label]
            colours += colour_of(frames) == SHAPE_CLASSES[label]
            moving += float((centroid(frames[0]) - centroid(frames[-1])).norm()) > 1.0
    assert colours == 8, f"{colours} of 8 samples in the requested class's colour"
    assert shapes >= 4 and moving >= 3, (shapes, moving)


def test_the_skip_wan_miniature_pair_is_the_trained_wan_with_and_without_long_skips():
    """docs/skip-wan.md: the converted Wan (15 long skips, the residual fusion; the first conversion, with the paper's
    fusion, beside it) and the vanilla one trained on as long, all from wan-shapes; each Skip-Wan's non-branch tensors
    have the base's names and shapes, and its branches are 7% of it (width 128)."""
    skip, ckpt = load_model(os.path.join(DEEP, "skip-wan-shapes.safetensors"))
    first, _ = load_model(os.path.join(DEEP, "skip-wan-shapes-replace.safetensors"))
    twin, _ = load_model(os.path.join(DEEP, "wan-shapes-continued.safetensors"))
    base, _ = load_model(WAN_SHAPES)
    assert ckpt.family == "wan" and skip.stack.num_units == 30 and skip.stack.num_skips == 15
    assert (skip.skip_fusion, first.skip_fusion) == ("residual", "replace") and first.stack.num_skips == 15
    assert first.state_dict().keys() == skip.state_dict().keys()
    assert twin.stack.num_skips == 0
    vanilla = {k: tuple(v.shape) for k, v in base.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in twin.state_dict().items()} == vanilla
    sd = skip.state_dict()
    branches = {k for k in sd if k.startswith(("skip_norms.", "skip_linears."))}
    assert {k: tuple(v.shape) for k, v in sd.items() if k not in branches} == vanilla
    share = sum(sd[k].numel() for k in branches) / sum(v.numel() for v in sd.values())
    assert 0.05 < share < 0.2, share
