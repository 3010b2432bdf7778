"""`skipdit sample-many`: many samples sharded over processes (torchrun / accelerate launch), resumable,
one .npz per setting and a summary. The multi-process checks launch 2 CPU processes with gloo through
`torch.distributed.run` (what `torchrun` is)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import randomize
from skipdit_core import models
from skipdit_core.loading import save_safetensors
from skipdit_core.pipeline import Request, generate
from skipdit_core.parallel import Processes
from skipdit_core.sample_many import Setting, batch_request, batches, write_npz
from skipdit_core.skip_cache import SkipCacheConfig

ROOT = Path(__file__).resolve().parents[1]


def tiny_latte(path: Path, **overrides) -> Path:
    config = models.make_config("latte", {"in_channels": 3, **overrides}, preset="Latte-tiny")
    torch.manual_seed(0)
    save_safetensors(randomize(models.build_model("latte", config), seed=1).state_dict(), path, "latte", config)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_latte(tmp_path_factory.mktemp("ckpt") / "latte-tiny-skip.safetensors", skip=True)


def command(checkpoint: Path, out: Path, num_samples=6, steps=6, extra=()) -> list[str]:
    return ["-m", "skipdit_core", "sample-many", str(checkpoint), "--num-samples", str(num_samples), "--labels", "all",
            "--out", str(out), "--sampler", "ddim", "--steps", str(steps), "--guidance", "3", "--batch-size", "2",
            "--cache-intervals", "1", "2", "--cache-start", "1000", "--cache-end", "0", "--no-progress", "--device", "cpu", *extra]


def launch(args: list[str], processes: int = 1, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    prefix = [sys.executable] if processes == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    done = subprocess.run(prefix + args, capture_output=True, text=True, env=env, timeout=300, **kw)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.np[yz]"))}


@pytest.fixture(scope="module")
def single(checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one-process")
    launch(command(checkpoint, out))
    return out


def test_one_process_writes_every_sample_an_npz_per_setting_and_a_summary(single):
    assert sorted(p.name for p in single.iterdir()) == ["n2_1000-0_k1", "n2_1000-0_k1.npz", "summary.json", "uncached", "uncached.npz"]
    with np.load(single / "uncached.npz") as npz:
        assert npz["arr_0"].shape == (6, 4, 8, 8, 3) and npz["arr_0"].dtype == np.uint8  # N, F, H, W, RGB
        assert npz["labels"].tolist() == [0, 1, 2, 3, 4, 0]  # --labels all cycles through the 5 classes
        assert np.array_equal(npz["arr_0"][4], np.load(single / "uncached" / "000004.npy"))
    summary = json.loads((single / "summary.json").read_text())
    assert summary["processes"] == 1 and summary["num_samples"] == 6 and summary["family"] == "latte"
    plain, cached = summary["settings"]
    assert plain["skip_cache"] is None and "full_steps" not in plain
    assert cached["skip_cache"] == "n=2 1000->0 k=1" and (cached["full_steps"], cached["cached_steps"]) == (3, 3)
    assert cached["empty_steps"] == 0
    assert cached["block_compute"] == pytest.approx((3 * 4 + 3 * 2) / 24)  # 4 pairs, k = 1 on cached steps
    for row in (plain, cached):
        assert row["made_this_run"] == 6 and row["already_complete"] == 0 and row["samples_per_second"] > 0
    with np.load(single / "n2_1000-0_k1.npz") as a, np.load(single / "uncached.npz") as b:
        assert not np.array_equal(a["arr_0"], b["arr_0"])  # cached steps change the samples


def test_two_gloo_processes_write_the_same_files_as_one(checkpoint, single, tmp_path):
    done = launch(command(checkpoint, tmp_path), processes=2)
    assert files(tmp_path) == files(single)  # byte for byte: per-batch seeds, not per-process ones
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["processes"] == 2 and [r["made_this_run"] for r in summary["settings"]] == [6, 6]
    assert done.stdout.count("wrote ") == 1  # the main process reports, once


def test_a_killed_run_resumes_with_no_sample_missing_or_made_twice(checkpoint, single, tmp_path):
    proc = subprocess.Popen([sys.executable] + command(checkpoint, tmp_path, extra=["--batch-size", "1"]),
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = tmp_path / "uncached"
    deadline = time.time() + 120
    while len(list(folder.glob("0*.npy"))) < 2:
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {p.name: p.stat().st_mtime_ns for p in folder.glob("0*.npy")}
    assert 2 <= len(before) < 6 and not (tmp_path / "summary.json").exists()
    launch(command(checkpoint, tmp_path, extra=["--batch-size", "1"]))
    summary = json.loads((tmp_path / "summary.json").read_text())
    plain = summary["settings"][0]
    assert plain["already_complete"] == len(before) and plain["made_this_run"] == 6 - len(before)
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("0*.npy") if p.name in before} == before  # not redone
    assert sorted(p.name for p in folder.iterdir()) == [f"{i:06d}.npy" for i in range(6)]  # no leftover temporaries
    # batch size 1: the same samples as a run never killed
    reference = tmp_path.parent / "reference"
    launch(command(checkpoint, reference, extra=["--batch-size", "1"]))
    assert files(tmp_path) == files(reference)


# ----------------------------------------------------------------------------- in-process pieces


def test_batches_and_per_batch_requests():
    assert batches(5, 2) == [range(0, 2), range(2, 4), range(4, 5)]
    with pytest.raises(ValueError, match="at least 1"):
        batches(0, 2)
    base = Request("latte", label=None, seed=7)
    req = batch_request(base, range(4, 6), seed=9, labels=[0, 1, 2])
    assert (req.batch, req.seed, req.label) == (2, 9, [1, 2])
    text = {"prompt_embeds": torch.arange(3.0).reshape(3, 1, 1), "negative_prompt_embeds": torch.zeros(1, 1, 1)}
    req = batch_request(Request("latte_t2v", text=text), range(2, 5), seed=0, labels=None)
    assert req.text["prompt_embeds"].flatten().tolist() == [2.0, 0.0, 1.0]  # sample i: prompt i % 3
    assert req.text["negative_prompt_embeds"].shape[0] == 1  # shared rows stay shared
    assert Setting.of(None).name == "uncached"
    assert Setting.of(SkipCacheConfig(interval=3, start=700, end=50, depth=1, forecast=2)).name == "n3_700-50_k1_forecast2"


def test_a_batch_of_labels_equals_each_sample_alone(checkpoint):
    """Batch composition is the only thing that may change a sample's numbers: one label per sample in a
    batch gives each sample what a batch of that label alone gives, to float tolerance."""
    from skipdit_core.loading import load_model

    model, _ = load_model(str(checkpoint))
    base = Request("latte", frames=4, size=8, sampler="ddim", steps=4, guidance=3.0, seed=0)
    mixed = generate(model, batch_request(base, range(0, 2), 5, [1, 3]), None).sample
    same = generate(model, batch_request(base, range(0, 2), 5, [3]), None).sample
    torch.testing.assert_close(mixed[1], same[1], rtol=1e-5, atol=1e-5)  # same noise, same label 3
    assert not torch.allclose(mixed[0], same[0])


def test_npz_refuses_a_folder_with_missing_samples(tmp_path):
    folder = tmp_path / "uncached"
    folder.mkdir()
    np.save(folder / "000000.npy", np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(RuntimeError, match=r"1 of 2 samples missing \(first: 000001.npy\)"):
        write_npz(folder, tmp_path / "uncached.npz", 2, None)


def test_labels_all_needs_a_class_conditional_model(tmp_path):
    from skipdit_core.cli import main

    ckpt = tiny_latte(tmp_path / "uncond.safetensors", num_classes=0)
    assert main(["sample-many", str(ckpt), "--num-samples", "1", "--labels", "all", "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2


def test_processes_from_the_launchers_environment(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert Processes.from_environment() == Processes(3, 8, 1) and not Processes(3, 8, 1).main
