"""The training scripts on tiny models: every recipe runs, stage 1 trains only the skip branches,
checkpoints load, resume continues exactly, strict configs, and two accelerate processes."""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

pytest.importorskip("accelerate", reason="training needs accelerate: pip install -e .[train]")
from accelerate.utils import set_seed  # noqa: E402

from helpers import randomize, wait_for_checkpoint  # noqa: E402
from skipdit_core import models  # noqa: E402
from skipdit_core.loading import load_model, save_safetensors  # noqa: E402
from training.config import ConfigError, from_dict, load_config  # noqa: E402
from training.train import build_model, train  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "training", "configs", "*.yaml")))
DEMO = os.path.join(ROOT, "training", "configs", "demo-skip-latte.yaml")

# Tiny stand-ins for each family's model and data (3-channel pixels, 8x8).
TINY_MODEL = {
    "dit": dict(depth=4, hidden_size=32, num_heads=2, patch_size=2, input_size=8, in_channels=3),
    "latte": dict(depth=4, hidden_size=32, num_heads=2, patch_size=2, input_size=8, in_channels=3, num_frames=4),
    "latte_t2v": dict(num_layers=2, num_heads=2, head_dim=16, patch_size=2, sample_size=8, in_channels=3,
                      out_channels=6, caption_channels=32, video_length=4),
    "wan": dict(dim=32, ffn_dim=64, num_layers=2, num_heads=2, in_channels=3, out_channels=3, text_dim=16,
                freq_dim=32, text_len=4),
}
TINY_DATA = {
    "dit": dict(type="moving_shapes", num_frames=1, size=8, num_classes=4, length=64),
    "latte": dict(type="moving_shapes", num_frames=4, size=8, num_classes=4, length=64),
    "latte_t2v": dict(type="moving_shapes", num_frames=4, size=8, num_classes=4, length=64, text_len=6, text_dim=32),
    "wan": dict(type="moving_shapes", num_frames=2, size=8, num_classes=4, length=64, text_len=4, text_dim=16),
}


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def tiny(raw: dict, out_dir, **train) -> dict:
    """A recipe shrunk to a tiny model and synthetic data, everything else as the recipe says."""
    raw = json.loads(json.dumps(raw))
    family = raw["model"]["family"]
    recipe_model = raw["model"].get("config") or {}
    if family == "wan":  # long skips: num_skips (the tiny model's 2 blocks hold one)
        config = dict(TINY_MODEL[family], num_skips=1 if recipe_model.get("num_skips") else 0)
    else:
        config = dict(TINY_MODEL[family], skip=bool(recipe_model.get("skip", False)))
    if family in ("dit", "latte"):
        config["num_classes"] = 4 if recipe_model.get("num_classes", 4) else 0
    if "prediction" in recipe_model:
        config["prediction"] = recipe_model["prediction"]
    raw["model"].update(preset=None, config=config)
    raw["data"] = dict(TINY_DATA[family])
    raw["train"].update({"output_dir": str(out_dir), "max_steps": 2, "batch_size": 2, "grad_accum_steps": 1,
                         "log_every": 1, "save_every": 2, "num_workers": 0, "mixed_precision": "no", **train})
    raw["sample"] = {"every": 0}
    return raw


def write_pretrained(path, family: str, skip: bool, num_classes: int = 4) -> dict:
    """A random tiny checkpoint in the layout the loader reads, like a downloaded release."""
    overrides = dict(TINY_MODEL[family], **({"num_skips": int(skip)} if family == "wan" else {"skip": skip}))
    if family in ("dit", "latte"):
        overrides["num_classes"] = num_classes
    config = models.make_config(family, overrides)
    model = randomize(models.build_model(family, config), seed=1)
    save_safetensors(model.state_dict(), path, family, config)
    return {k: v.clone() for k, v in model.state_dict().items()}


def run_dir_checkpoint(out_dir, step: int) -> str:
    return os.path.join(str(out_dir), "checkpoints", f"step-{step:08d}")


@pytest.mark.parametrize("recipe", RECIPES, ids=[os.path.basename(r)[:-5] for r in RECIPES])
def test_every_recipe_runs_a_few_steps(recipe, tmp_path):
    with open(recipe) as f:
        raw = yaml.safe_load(f)
    load_config(recipe)  # the recipe itself is valid as written
    family = raw["model"]["family"]
    init_from = raw["model"].get("init_from")
    if init_from:  # stage 1 starts from a vanilla release, stage 2 from a stage-1 run folder
        stage2 = not init_from.endswith((".safetensors", ".pt"))  # a run folder: stage 1's output
        if stage2:
            prior = tiny(raw, tmp_path / "stage1", trainable="skip_branches")
            prior["model"]["init_from"] = str(tmp_path / "vanilla.safetensors")
            write_pretrained(tmp_path / "vanilla.safetensors", family, skip=False)
            train(from_dict(prior))
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state(reset_partial_state=True)
            init_from = str(tmp_path / "stage1")
        else:
            write_pretrained(tmp_path / "vanilla.safetensors", family, skip=False)
            init_from = str(tmp_path / "vanilla.safetensors")
    cfg = tiny(raw, tmp_path / "run")
    cfg["model"]["init_from"] = init_from
    result = train(from_dict(cfg))
    assert result["step"] == 2 and result["checkpoint"] == run_dir_checkpoint(tmp_path / "run", 2)
    assert torch.isfinite(torch.tensor(result["loss"]))
    rows = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert [r["step"] for r in rows] == [1, 2] and all(r["samples_per_s"] > 0 for r in rows)
    model, ckpt = load_model(os.path.join(result["checkpoint"], "ema.safetensors"))
    assert ckpt.family == family
    recipe_model = raw["model"].get("config", {})
    assert bool(getattr(model, "skip_norms", None)) == bool(recipe_model.get("skip") or recipe_model.get("num_skips"))
    assert getattr(model.config, "prediction", "eps") == raw["model"].get("config", {}).get("prediction", "eps")


def test_stage1_changes_only_the_skip_branches_and_stage2_everything(tmp_path):
    before = write_pretrained(tmp_path / "vanilla.safetensors", "latte", skip=False)
    raw = tiny(yaml.safe_load(open(os.path.join(ROOT, "training/configs/convert-latte-ucf101-stage1.yaml"))),
               tmp_path / "s1", lr=1e-2, warmup_steps=0)
    raw["model"]["init_from"] = str(tmp_path / "vanilla.safetensors")
    cfg = from_dict(raw)
    set_seed(cfg.train.seed)  # as train() does (process 0): the same fresh skip branches
    start = build_model(cfg, log=lambda *_: None).state_dict()
    result = train(cfg)
    after = load_file(os.path.join(result["checkpoint"], "model.safetensors"))
    skip_keys = sorted(k for k in after if k.startswith(("skip_norms.", "skip_linears.")))
    assert len(skip_keys) == 4  # 2 pairs -> 1 long skip: norm weight / bias, linear weight / bias
    assert set(after) == set(before) | set(skip_keys)
    for k, v in before.items():
        assert torch.equal(after[k], v), f"stage 1 changed the frozen parameter {k}"
    for k in skip_keys:
        assert not torch.equal(after[k], start[k]), f"stage 1 did not train {k}"
    log = [json.loads(line) for line in open(tmp_path / "s1" / "log.jsonl")]
    assert len(log) == 2

    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    raw2 = tiny(yaml.safe_load(open(os.path.join(ROOT, "training/configs/convert-latte-ucf101-stage2.yaml"))),
                tmp_path / "s2", lr=1e-2, warmup_steps=0)
    raw2["model"]["init_from"] = str(tmp_path / "s1")
    stage2 = load_file(os.path.join(train(from_dict(raw2))["checkpoint"], "model.safetensors"))
    start = load_file(os.path.join(result["checkpoint"], "ema.safetensors"))
    changed = [k for k in stage2 if not torch.equal(stage2[k], start[k].to(stage2[k].dtype))]
    frozen_tables = {"pos_embed", "temp_embed"}
    assert set(stage2) - set(changed) == frozen_tables  # everything else trains in stage 2


def test_stage1_needs_a_skip_model(tmp_path):
    raw = tiny(yaml.safe_load(open(DEMO)), tmp_path, trainable="skip_branches")
    raw["model"]["config"]["skip"] = False
    with pytest.raises(ValueError, match="needs a Skip-DiT model"):
        train(from_dict(raw))


def test_resumed_run_equals_an_uninterrupted_one(tmp_path):
    raw = yaml.safe_load(open(DEMO))
    straight = train(from_dict(tiny(raw, tmp_path / "a", max_steps=4)))
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    train(from_dict(tiny(raw, tmp_path / "b", max_steps=2)))  # "interrupted" after its step-2 save
    AcceleratorState._reset_state(reset_partial_state=True)
    resumed = train(from_dict(tiny(raw, tmp_path / "b", max_steps=4)), resume_run=True)
    assert straight["step"] == resumed["step"] == 4
    rows = [json.loads(line) for line in open(tmp_path / "b" / "log.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(os.path.join(straight["checkpoint"], name))
        b = load_file(os.path.join(resumed["checkpoint"], name))
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{name}:{k}")


def test_sigkill_then_resume_continues_from_the_last_save(tmp_path):
    raw = tiny(yaml.safe_load(open(DEMO)), tmp_path / "run", max_steps=100000, save_every=3)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "training.train", "--config", str(config)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = tmp_path / "run" / "checkpoints" / "latest"
    try:  # kill it once it has saved twice (mid-run, maybe mid-save)
        wait_for_checkpoint(latest, "step-00000006", 120, proc, "the training run")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    saved = int(latest.read_text().split("-")[1])
    assert saved >= 6 and saved % 3 == 0
    for d in glob.glob(str(tmp_path / "run" / "checkpoints" / "step-*")):
        assert os.path.isfile(os.path.join(d, "trainer.json"))  # no half-written step folder under a final name
    out = subprocess.run(cmd + ["--resume", "--set", f"train.max_steps={saved + 2}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"at step {saved}" in out.stdout + out.stderr
    steps = [json.loads(line)["step"] for line in open(tmp_path / "run" / "log.jsonl")]
    assert steps == list(range(1, saved + 3))  # rows of the steps lost to the kill are dropped on resume
    final = json.load(open(tmp_path / "run" / "checkpoints" / f"step-{saved + 2:08d}" / "trainer.json"))
    assert final["step"] == saved + 2
    model, ckpt = load_model(tmp_path / "run" / "checkpoints" / f"step-{saved + 2:08d}" / "ema.safetensors")
    assert ckpt.family == "latte" and model.config.skip


def test_unknown_fields_are_rejected_with_the_file_and_field(tmp_path):
    raw = yaml.safe_load(open(DEMO))
    raw["train"]["learning_rate"] = 1e-4
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown field\(s\) train\.learning_rate; train accepts: .*lr"):
        load_config(str(path))
    del raw["train"]["learning_rate"]
    with pytest.raises(ConfigError, match="unknown section"):
        from_dict({**raw, "optimizer": {}})
    with pytest.raises(ConfigError, match="trainable"):
        from_dict({**raw, "train": {**raw["train"], "trainable": "some"}})
    bad_data = tiny(raw, tmp_path / "x")
    bad_data["data"]["frames"] = 8
    with pytest.raises(ValueError, match="unknown key.*frames.*moving_shapes"):
        train(from_dict(bad_data))
    assert load_config(DEMO, ["train.lr=1e-3"]).train.lr == 1e-3  # YAML's "1e-3" string becomes a float


def test_two_accelerate_processes_on_cpu(tmp_path):
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("the accelerate command is not installed")
    raw = tiny(yaml.safe_load(open(DEMO)), tmp_path / "run", max_steps=3, save_every=3)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = subprocess.run(
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", "29517", "-m", "training.train", "--config", str(config)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert "2 process(es)" in text and "global batch 4 (2 x 2 x 1" in text
    state = tmp_path / "run" / "checkpoints" / "step-00000003"
    assert (state / "resume" / "random_states_1.pkl").exists()  # both processes' RNG saved
    rows = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3]  # one writer, not two
    load_model(state / "ema.safetensors")
