"""Training under FSDP (training/accelerate/fsdp-wan.yaml, training/sharding.py) on 2 CPU processes over gloo, at a
tiny Wan: a run SIGKILLed after its second checkpoint and resumed with --resume ends with exactly the weights and EMA
of an uninterrupted run; and activation checkpointing of the blocks changes no number."""
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

from helpers import randomize, wait_for_checkpoint  # noqa: E402
from skipdit_core import models  # noqa: E402
from skipdit_core.loading import load_model, save_safetensors  # noqa: E402
from training.config import from_dict  # noqa: E402
from training.train import train  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FSDP_CONFIG = os.path.join(ROOT, "training", "accelerate", "fsdp-wan.yaml")
RECIPE = os.path.join(ROOT, "training", "configs", "convert-wan2.1-t2v-14B-stage2.yaml")
# 4 blocks, so that FSDP shards 4 WanBlock units and the root (embeddings, skip branches, head)
TINY = dict(dim=32, ffn_dim=64, num_layers=4, num_heads=2, in_channels=3, out_channels=3, text_dim=16, freq_dim=32,
            text_len=4, num_skips=2)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def tiny_recipe(tmp_path, out_dir, **train_overrides) -> dict:
    """The 14B stage-2 recipe (FSDP, everything trains) on a tiny Skip-Wan and 2-frame 8x8 moving shapes."""
    start = tmp_path / "skip-wan.safetensors"
    if not start.exists():
        config = models.make_config("wan", TINY)
        save_safetensors(randomize(models.build_model("wan", config), seed=1).state_dict(), str(start), "wan", config)
    with open(RECIPE) as f:
        raw = yaml.safe_load(f)
    raw["model"].update(config=dict(TINY), init_from=str(start))
    raw["data"] = dict(type="moving_shapes", num_frames=2, size=8, num_classes=4, length=64, text_len=4, text_dim=16)
    raw["train"].update({"output_dir": str(out_dir), "batch_size": 2, "grad_accum_steps": 1, "log_every": 1,
                         "save_every": 2, "mixed_precision": "no", "num_workers": 0, "save_dtype": None, "lr": 1e-3,
                         "warmup_steps": 2, **train_overrides})
    raw["sample"] = {"every": 0}
    return raw


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config_path, *extra) -> list:
    """2 processes under the FSDP config as written (but mixed precision off: exact comparisons)."""
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("the accelerate command is not installed")
    return [accelerate, "launch", "--config_file", FSDP_CONFIG, "--num_processes", "2", "--mixed_precision", "no",
            "--main_process_port", str(free_port()), "-m", "training.train", "--config", str(config_path), *extra]


ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launch: its training processes (torch's launcher starts each in a session of its own, so they are
    found as its children, not by process group) and the launcher, at once."""
    import psutil

    try:
        victims = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        victims = []
    for p in victims:
        try:
            os.kill(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.kill()
    proc.wait()
    psutil.wait_procs(victims, timeout=30)


def test_fsdp_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    total = 8
    straight_cfg, killed_cfg = tmp_path / "straight.yaml", tmp_path / "killed.yaml"
    straight = tiny_recipe(tmp_path, tmp_path / "straight", max_steps=total)
    straight["sample"] = {"every": total, "sampler": "euler", "steps": 2, "guidance": 3.0, "labels": [1]}  # gathered EMA
    straight_cfg.write_text(yaml.safe_dump(straight))
    killed_cfg.write_text(yaml.safe_dump(tiny_recipe(tmp_path, tmp_path / "killed", max_steps=100000)))
    # both at once
    straight_log = open(tmp_path / "straight.log", "w")
    straight = subprocess.Popen(launch(straight_cfg), cwd=ROOT, env=ENV, stdout=straight_log, stderr=subprocess.STDOUT)
    killed = subprocess.Popen(launch(killed_cfg), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    try:  # kill it once it has saved twice (mid-run, maybe mid-save)
        wait_for_checkpoint(latest, "step-00000004", 240, killed, "the FSDP run")
    finally:
        kill_tree(killed)
    saved = int(latest.read_text().split("-")[1])
    assert saved in (4, 6), saved  # at least two steps are left to resume
    for d in (tmp_path / "killed" / "checkpoints").glob("step-*"):
        assert (d / "trainer.json").is_file()  # no half-written step folder under a final name
    state = tmp_path / "killed" / "checkpoints" / f"step-{saved:08d}" / "resume"
    assert len(list((state / "ema").glob("*.distcp"))) == 2  # the EMA sharded, one file per process
    assert (state / "pytorch_model_fsdp_0").is_dir() and (state / "optimizer_0").is_dir()  # accelerate's sharded state

    resumed = subprocess.run(launch(killed_cfg, "--resume", "--set", f"train.max_steps={total}"), cwd=ROOT,
                             env=ENV, capture_output=True, text=True, timeout=240)
    text = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, text[-3000:]
    assert f"at step {saved}" in text and "(FSDP)" in text
    straight.wait(timeout=240)
    straight_log.close()
    out = (tmp_path / "straight.log").read_text()
    assert straight.returncode == 0, out[-3000:]
    assert "2 process(es) on cpu:0 (FSDP)" in out and "accelerate's FSDP plugin wraps the blocks" in out

    # the same numbers, bit for bit: same data order, noise, optimizer state and EMA after the kill
    a_dir = tmp_path / "straight" / "checkpoints" / f"step-{total:08d}"
    b_dir = tmp_path / "killed" / "checkpoints" / f"step-{total:08d}"
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(str(a_dir / name)), load_file(str(b_dir / name))
        assert a.keys() == b.keys() and len(a) == len(models.build_model("wan", models.make_config("wan", TINY)).state_dict())
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}:{k} differs by {(a[k] - b[k]).abs().max().item():.3g}"
    rows = lambda run: [json.loads(line) for line in open(tmp_path / run / "log.jsonl")]  # noqa: E731
    assert [r["step"] for r in rows("killed")] == list(range(1, total + 1))
    assert [r["loss"] for r in rows("killed")] == [r["loss"] for r in rows("straight")]
    ema, model = load_file(str(a_dir / "ema.safetensors")), load_file(str(a_dir / "model.safetensors"))
    assert any(not torch.equal(ema[k], model[k]) for k in ema)  # an EMA, not a copy of the weights
    loaded, ckpt = load_model(str(a_dir / "ema.safetensors"))
    assert ckpt.family == "wan" and loaded.config.num_skips == 2
    assert os.listdir(tmp_path / "straight" / "samples") == [f"step-{total:08d}-class1.mp4"]  # sampled from the gathered EMA


def test_activation_checkpointing_changes_no_number(tmp_path):
    """train.activation_checkpointing (the blocks' forward recomputed in the backward pass) trains the same weights."""
    results = {}
    for flag in (False, True):
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
        raw = tiny_recipe(tmp_path, tmp_path / f"ac-{flag}", max_steps=2, activation_checkpointing=flag)
        results[flag] = load_file(os.path.join(train(from_dict(raw))["checkpoint"], "model.safetensors"))
    assert all(torch.equal(results[False][k], results[True][k]) for k in results[False])
    start = load_file(str(tmp_path / "skip-wan.safetensors"))
    assert not torch.equal(results[True]["blocks.0.ffn.0.weight"], start["blocks.0.ffn.0.weight"])  # it trained
