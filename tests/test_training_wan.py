"""Training a Wan: the rectified-flow objective (noising, velocity target, shifted sigma draw), its selection by
family, the Wan inputs and text dropout of the loop, a tiny run whose checkpoint loads as a Wan with its class
embeddings beside it, the loss going down, and the wan-shapes recipe fitting ComfyUI's stock Wan detection."""
import hashlib
import json
import math
import os

import pytest
import torch
import yaml

pytest.importorskip("accelerate", reason="training needs accelerate: pip install -e .[train]")

from skipdit_core.flow import WAN_SHIFT, shift_sigmas  # noqa: E402
from skipdit_core.loading import load_model  # noqa: E402
from skipdit_core.models.wan import WAN_HEAD_DIM, config_from_state_dict  # noqa: E402
from skipdit_core.pipeline import Request, generate  # noqa: E402
from skipdit_core.shape_prompts import (  # noqa: E402
    CLASS_EMBEDS_FILE, class_prompt_embeds, class_text, find_class_embeds, load_class_embeds, load_class_text,
)
from training.config import ConfigError, from_dict, load_config  # noqa: E402
from training.data import MovingShapes  # noqa: E402
from training.objective import DiffusionObjective, FlowObjective, make_objective  # noqa: E402
from training.train import drop_text, model_inputs, train  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "training", "configs", "wan-shapes.yaml")
TINY = dict(dim=32, ffn_dim=64, num_layers=2, num_heads=2, in_channels=3, out_channels=3, text_dim=16, freq_dim=32,
            text_len=4)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def tiny_recipe(out_dir, **train) -> dict:
    """The wan-shapes recipe on a tiny Wan and 2-frame 8x8 clips."""
    with open(RECIPE) as f:
        raw = yaml.safe_load(f)
    raw["model"]["config"] = dict(TINY)
    raw["data"] = dict(type="moving_shapes", num_frames=2, size=8, num_classes=4, length=64, colours="by_class",
                       text_len=4, text_dim=16, seed=3)
    raw["train"].update({"output_dir": str(out_dir), "max_steps": 2, "batch_size": 2, "log_every": 1,
                         "save_every": 2, "mixed_precision": "no", "save_dtype": None, **train})
    raw["sample"] = {"every": 0}
    return raw


# ---------------------------------------------------------------------------- the objective


def test_flow_noising_and_velocity_target():
    obj = FlowObjective()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(4, 3, 2, 4, 4, generator=g) * 2 - 1, torch.randn(4, 3, 2, 4, 4, generator=g)
    sigma = torch.tensor([0.0, 1.0, 0.25, 0.7])
    x_t = obj.q_sample(x0, sigma, eps)
    assert torch.equal(x_t[0], x0[0]) and torch.equal(x_t[1], eps[1])  # s = 0: the data, s = 1: the noise
    torch.testing.assert_close(x_t[2], 0.75 * x0[2] + 0.25 * eps[2])
    v = eps - x0
    torch.testing.assert_close(obj.target(x0, eps), v)
    # d x_sigma / d sigma is v: the Euler step of the sampler undoes the noising exactly with the true v.
    torch.testing.assert_close(x_t[3] - 0.7 * v[3], x0[3])
    terms = obj.losses(v, x0, x_t, sigma, eps)
    assert terms["loss"].abs().max() < 1e-12 and torch.equal(terms["loss"], terms["mse"]) and (terms["vb"] == 0).all()
    torch.testing.assert_close(obj.losses(v + 0.1, x0, x_t, sigma, eps)["loss"], torch.full((4,), 0.01))
    with pytest.raises(ValueError, match="velocity"):
        obj.losses(torch.zeros(4, 6, 2, 4, 4), x0, x_t, sigma, eps)  # no learned variance channels
    torch.testing.assert_close(obj.model_timesteps(sigma), sigma * 1000)


def test_flow_sigmas_follow_the_samplers_shift():
    g = torch.Generator().manual_seed(0)
    sigma = FlowObjective().sample_timesteps(20000, "cpu", g)
    assert sigma.dtype == torch.float32 and sigma.min() >= 0 and sigma.max() < 1
    # sigma = shift(u), u uniform: the quantiles are the shifted uniform grid, as flow_sigmas spaces the sampler.
    qs = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
    expected = torch.from_numpy(shift_sigmas(qs.double().numpy(), WAN_SHIFT)).float()
    torch.testing.assert_close(torch.quantile(sigma, qs), expected, atol=0.01, rtol=0)
    assert abs(torch.quantile(sigma, 0.5).item() - 5 / 6) < 0.01  # shift 5: the median sigma is 5/6
    plain = FlowObjective(shift=1.0).sample_timesteps(20000, "cpu", torch.Generator().manual_seed(1))
    assert abs(plain.mean().item() - 0.5) < 0.01  # shift 1: uniform
    with pytest.raises(ValueError, match="positive"):
        FlowObjective(shift=0.0)


def test_objective_by_family():
    assert isinstance(make_objective("wan"), FlowObjective) and make_objective("wan").shift == WAN_SHIFT
    assert make_objective("wan", flow_shift=3.0).shift == 3.0
    latte = make_objective("latte")
    assert isinstance(latte, DiffusionObjective) and latte.channel_dim == 2
    t = torch.tensor([3, 999])
    assert torch.equal(latte.model_timesteps(t), t.float())
    with pytest.raises(ValueError, match="flow shift"):
        make_objective("latte_t2v", flow_shift=5.0)


# ---------------------------------------------------------------------------- the loop's inputs


def test_wan_inputs_and_text_dropout():
    ds = MovingShapes(num_frames=2, size=8, length=8, text_len=4, text_dim=16)
    batch = torch.utils.data.default_collate([ds[i] for i in range(8)])
    batch["prompt_attention_mask"][0, 2:] = 0  # padding tokens become zero states (Wan has no mask)
    x0, cond, channel_dim = model_inputs("wan", batch, 0)
    assert x0.shape == (8, 3, 2, 8, 8) and channel_dim == 1 and set(cond) == {"encoder_hidden_states"}
    states = cond["encoder_hidden_states"]
    assert (states[0, 2:] == 0).all() and torch.equal(states[1], batch["prompt_embeds"][1])
    dropped = drop_text(cond, 0.5, torch.Generator().manual_seed(0))["encoder_hidden_states"]
    zero = (dropped == 0).flatten(1).all(1)
    assert 0 < zero.sum() < 8
    assert torch.equal(dropped[~zero], states[~zero])  # the kept samples are untouched
    again = drop_text(cond, 0.5, torch.Generator().manual_seed(0))["encoder_hidden_states"]
    assert torch.equal(dropped, again)  # from the loop's per-micro-batch generator: resumable
    with pytest.raises(ValueError, match="wan trains on text"):
        model_inputs("wan", {"x": batch["x"], "label": batch["label"]}, 0)


def test_class_embeddings_are_the_datas_and_regenerate():
    ds = MovingShapes(num_frames=2, size=8, length=8, text_len=4, text_dim=16, seed=7)
    for c in range(4):
        assert torch.equal(ds[c]["prompt_embeds"], class_prompt_embeds(c, 4, 16, seed=7))
    # The draw itself (what MovingShapes has always used): N(0, 1) from sha256(repr(("caption", seed, class))).
    digest = hashlib.sha256(repr(("caption", 7, 2)).encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    assert torch.equal(class_prompt_embeds(2, 4, 16, seed=7), torch.randn(4, 16, generator=g))
    text = class_text(1, 4, 16, seed=7)
    assert text["prompt_embeds"].shape == (1, 4, 16) and text["prompt_attention_mask"].tolist() == [[1] * 4]


# ---------------------------------------------------------------------------- configs


def test_wan_config_checks():
    raw = tiny_recipe("unused")
    assert from_dict(raw).train.flow_shift == 5.0
    bad = json.loads(json.dumps(raw))
    bad["sample"] = {"every": 10, "sampler": "ddim"}
    with pytest.raises(ConfigError, match="euler"):
        from_dict(bad)
    bad = json.loads(json.dumps(raw))
    bad["train"]["text_dropout"] = 1.0
    with pytest.raises(ConfigError, match="text_dropout"):
        from_dict(bad)
    latte = yaml.safe_load(open(os.path.join(ROOT, "training", "configs", "deep-vanilla-latte.yaml")))
    latte["train"]["flow_shift"] = 5.0
    with pytest.raises(ConfigError, match="flow_shift"):
        from_dict(latte)
    latte["train"].pop("flow_shift")
    latte["train"]["text_dropout"] = 0.1
    with pytest.raises(ConfigError, match="class_dropout_prob"):
        from_dict(latte)


def test_recipe_fits_comfyuis_stock_wan_detection():
    """ComfyUI core's model detection (0.3.3x-0.3.6x) reads a Wan's width, ffn width, depth and channels from the
    weights but fixes num_heads = dim // 128, patch (1, 2, 2), freq_dim 256 and leaves text_dim at 4096, with
    out_dim = head.head.weight.shape[0] // 4: the recipe's model must be what that detection builds."""
    cfg = load_config(RECIPE)
    from skipdit_core import models

    config = models.make_config("wan", cfg.model.config)
    assert config.dim % WAN_HEAD_DIM == 0 and config.num_heads == config.dim // WAN_HEAD_DIM
    assert config.patch_size == (1, 2, 2) and config.freq_dim == 256 and config.text_dim == 4096
    assert config.num_layers == 30 and config.num_skips == 0
    assert cfg.data["text_dim"] == config.text_dim and cfg.data["text_len"] == config.text_len
    model = models.build_model("wan", config)
    sd = model.state_dict()
    assert sd["head.head.weight"].shape[0] // 4 == config.out_channels == 3
    assert sd["text_embedding.0.weight"].shape == (config.dim, 4096)
    detected = config_from_state_dict(sd)  # ours, with the same head-dim-128 rule
    assert detected.__class__(**{**detected.__dict__, "text_len": config.text_len}) == config
    assert cfg.sample.sampler == "euler" and cfg.train.flow_shift == WAN_SHIFT
    assert cfg.train.log_every == 50 and cfg.train.save_every == 500


# ---------------------------------------------------------------------------- training runs


def test_tiny_wan_run_writes_a_loadable_checkpoint_with_its_class_embeddings(tmp_path):
    raw = tiny_recipe(tmp_path / "run")
    raw["sample"] = {"every": 2, "sampler": "euler", "steps": 2, "guidance": 4.0, "labels": [0, 3]}
    result = train(from_dict(raw))
    assert result["step"] == 2 and math.isfinite(result["loss"])
    rows = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert [r["step"] for r in rows] == [1, 2] and all(r["vb"] == 0 and r["loss"] == r["mse"] for r in rows)
    samples = sorted(os.listdir(tmp_path / "run" / "samples"))  # one video per class, from its class embedding
    assert samples == ["step-00000002-class0.mp4", "step-00000002-class3.mp4"]
    ema_path = os.path.join(result["checkpoint"], "ema.safetensors")
    model, ckpt = load_model(ema_path)
    assert ckpt.family == "wan" and type(model).__name__ == "WanModel"
    assert {k: getattr(model.config, k) for k in TINY} == TINY and model.config.num_skips == 0
    # The class embeddings the run trained on, beside the weights, equal to the regenerated ones.
    assert find_class_embeds(ema_path) == os.path.join(result["checkpoint"], CLASS_EMBEDS_FILE)
    table, info = load_class_embeds(result["checkpoint"])
    assert table.shape == (4, 4, 16) and info["classes"] == ["circle", "square", "triangle", "cross"]
    assert info["seed"] == 3 and info["captions"][0] == "a circle moving"
    for c in range(4):
        assert torch.equal(table[c], class_prompt_embeds(c, 4, 16, seed=3))
    text = load_class_text(result["checkpoint"], "triangle")
    from safetensors.torch import load_file

    per_class = load_file(os.path.join(result["checkpoint"], "text-triangle.safetensors"))
    assert torch.equal(per_class["prompt_embeds"], text["prompt_embeds"]) and text["prompt_embeds"].shape == (1, 4, 16)
    # ... and the loaded model samples a class from them (Euler, guidance against zero states).
    out = generate(model, Request("wan", text=text, frames=2, size=8, steps=2, guidance=4.0))
    assert out.sample.shape == (1, 3, 2, 8, 8) and torch.isfinite(out.sample).all()


def test_tiny_wan_loss_decreases(tmp_path):
    raw = tiny_recipe(tmp_path / "run", max_steps=30, batch_size=8, log_every=10, save_every=30, warmup_steps=0,
                      lr=3e-3)
    train(from_dict(raw))
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "run" / "log.jsonl")]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.8 * losses[0], losses


def test_resumed_wan_run_equals_an_uninterrupted_one(tmp_path):
    """Flow sigmas, noise and text dropout all come from the loop's per-micro-batch generator."""
    from accelerate.state import AcceleratorState
    from safetensors.torch import load_file

    straight = train(from_dict(tiny_recipe(tmp_path / "a", max_steps=4, text_dropout=0.5)))
    AcceleratorState._reset_state(reset_partial_state=True)
    train(from_dict(tiny_recipe(tmp_path / "b", max_steps=2, text_dropout=0.5)))
    AcceleratorState._reset_state(reset_partial_state=True)
    resumed = train(from_dict(tiny_recipe(tmp_path / "b", max_steps=4, text_dropout=0.5)), resume_run=True)
    a = load_file(os.path.join(straight["checkpoint"], "ema.safetensors"))
    b = load_file(os.path.join(resumed["checkpoint"], "ema.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def _converted(tmp_path, skip_init: str, fusion: str = "replace"):
    """A trained-looking vanilla tiny Wan (4 blocks, random weights) and the stage-1 Skip-Wan built from it with
    `skip_init` and `fusion`, before any step: (base, converted)."""
    from helpers import randomize
    from skipdit_core import models
    from skipdit_core.loading import save_safetensors
    from training.train import _build_model, start_pass_through

    config = models.make_config("wan", dict(TINY, num_layers=4))
    base = randomize(models.build_model("wan", config), seed=5).eval()
    save_safetensors(base.state_dict(), str(tmp_path / "base.safetensors"), "wan", config)
    raw = tiny_recipe(tmp_path / "run", trainable="skip_branches")
    raw["model"].update(config=dict(TINY, num_layers=4, num_skips=2, skip_fusion=fusion),
                        init_from=str(tmp_path / "base.safetensors"), skip_init=skip_init)
    cfg = from_dict(raw)
    torch.manual_seed(0)
    model, new = _build_model(cfg, log=lambda *_: None)
    assert sorted(new) == sorted(k for k in model.state_dict() if k.startswith(("skip_norms.", "skip_linears.")))
    if skip_init == "pass_through":
        from training.data import build_dataset

        stats = start_pass_through(model, cfg, build_dataset(dict(cfg.data)), make_objective("wan", model.config))
        if fusion == "residual":
            assert stats == []
        else:
            assert len(stats) == 2 and all(s > 0 for s, _ in stats)
    return base, model.eval()


def _gap(base, converted) -> float:
    x, t = torch.randn(2, 3, 2, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([300.0, 800.0])
    ctx = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = base(x, t, ctx)
        return float((converted(x, t, ctx) - ref).norm() / ref.norm())


def test_pass_through_start_with_the_residual_fusion_equals_the_base_exactly(tmp_path):
    """The recipes' start: the converted model, before any step, computes the base's output bit for bit, and its
    branches are live (a step changes the output)."""
    base, converted = _converted(tmp_path, "pass_through", "residual")
    x, t = torch.randn(2, 3, 2, 8, 8), torch.tensor([0.0, 999.0])
    ctx = torch.randn(2, 4, 16)
    with torch.no_grad():
        assert torch.equal(converted(x, t, ctx), base(x, t, ctx))
    assert all(torch.count_nonzero(lin.linear.weight) == 0 for lin in converted.skip_linears)
    # one gradient step on the branches alone: the zero Linears get gradients, and the output moves off the base's
    branches = [p for n, p in converted.named_parameters() if n.startswith(("skip_norms.", "skip_linears."))]
    optimizer = torch.optim.SGD(branches, lr=0.5)
    converted.train()
    converted(x, t, ctx).square().mean().backward()
    assert all(torch.count_nonzero(lin.linear.weight.grad) > 0 for lin in converted.skip_linears)
    optimizer.step()
    assert _gap(base, converted.eval()) > 1e-4


def test_calibrated_pass_through_tracks_the_base_and_paper_start_does_not(tmp_path):
    """The paper's fusion: LayerNorm over concat([h, skip]) rules out an exact identity, so its pass-through start is
    calibrated: it must stay near the base model's output where the paper's fresh branches do not."""
    gaps = {skip_init: _gap(*_converted(tmp_path / skip_init, skip_init)) for skip_init in ("paper", "pass_through")}
    assert gaps["pass_through"] < 0.25 * gaps["paper"], gaps


def test_a_skip_checkpoint_keeps_its_fusion(tmp_path):
    """Stage 2 from a stage-1 run of the other fusion would load the same tensors into another function: refused."""
    from skipdit_core import models
    from skipdit_core.loading import save_safetensors
    from training.train import _build_model

    config = models.make_config("wan", dict(TINY, num_layers=4, num_skips=2, skip_fusion="residual"))
    save_safetensors(models.build_model("wan", config).state_dict(), str(tmp_path / "s1.safetensors"), "wan", config)
    raw = tiny_recipe(tmp_path / "run")
    raw["model"].update(config=dict(TINY, num_layers=4, num_skips=2, skip_fusion="replace"),
                        init_from=str(tmp_path / "s1.safetensors"))
    with pytest.raises(ValueError, match="trained with the 'residual' fusion, but model.config.skip_fusion is 'replace'"):
        _build_model(from_dict(raw), log=lambda *_: None)
    raw["model"]["config"]["skip_fusion"] = "residual"
    model, new = _build_model(from_dict(raw), log=lambda *_: None)
    assert model.skip_fusion == "residual" and new == []


def test_pass_through_needs_new_skip_branches(tmp_path):
    raw = tiny_recipe(tmp_path / "run")
    raw["model"]["skip_init"] = "pass_through"
    with pytest.raises(ValueError, match="pass_through starts new skip branches"):
        train(from_dict(raw))
    raw["model"]["skip_init"] = "identity"
    with pytest.raises(ConfigError, match="model.skip_init must be one of paper, pass_through"):
        from_dict(raw)


def test_skip_wan_stage1_trains_only_the_branches_and_stage2_starts_from_it(tmp_path):
    from safetensors.torch import load_file

    from training.train import resolve_init_from

    s1 = yaml.safe_load(open(os.path.join(ROOT, "training", "configs", "skip-wan-shapes-stage1.yaml")))
    raw = tiny_recipe(tmp_path / "s1", lr=1e-2, warmup_steps=0)
    base, _ = _converted(tmp_path / "base", "paper")  # writes base/base.safetensors
    raw["model"] = dict(s1["model"], config={**s1["model"]["config"], **TINY, "num_layers": 4, "num_skips": 2},
                        init_from=str(tmp_path / "base" / "base.safetensors"))
    raw["train"]["trainable"] = s1["train"]["trainable"]
    result = train(from_dict(raw))
    after = load_file(os.path.join(result["checkpoint"], "model.safetensors"))
    for k, v in base.state_dict().items():
        assert torch.equal(after[k], v), f"stage 1 changed the frozen {k}"
    assert sum(k.startswith(("skip_norms.", "skip_linears.")) for k in after) == 8  # 2 branches x 4 tensors
    # the recipe's exact pass-through starts every Linear at zero; stage 1 moved them
    assert s1["model"]["config"]["skip_fusion"] == "residual" and s1["model"]["skip_init"] == "pass_through"
    assert all(torch.count_nonzero(after[f"skip_linears.{j}.linear.weight"]) > 0 for j in range(2))
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    s2 = yaml.safe_load(open(os.path.join(ROOT, "training", "configs", "skip-wan-shapes-stage2.yaml")))
    assert s2["model"]["init_from"] == s1["train"]["output_dir"] and s2["train"]["trainable"] == "all"
    assert s2["model"]["config"] == s1["model"]["config"]
    assert resolve_init_from(str(tmp_path / "s1")) == os.path.join(result["checkpoint"], "ema.safetensors")
