"""One sample over 2 processes (CPU, gloo), for every family, uncached and with Skip-Cache n = 2:
CFG parallel (each process one guidance half) and sequence parallel (each process half of the tokens,
Ulysses self-attention through yunchang) equal one process to 1e-5 in float32. The cases are in
tests/parallel_cases.py, run once under torch.distributed.run."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import parallel_cases
from skipdit_core.pipeline import generate

pytest.importorskip("yunchang", reason="sequence parallel needs yunchang (the parallel extra)")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("parallel") / "samples.pt"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           str(ROOT / "tests" / "parallel_cases.py"), str(out)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return torch.load(out)


@pytest.mark.parametrize("cache", list(parallel_cases.CACHES))
@pytest.mark.parametrize("mode", ["cfg", "sequence"])
@pytest.mark.parametrize("name", list(parallel_cases.cases()))
def test_two_processes_equal_one(two_processes, name, mode, cache):
    family, preset, overrides, req = parallel_cases.cases()[name]
    model = parallel_cases.build(family, preset, overrides)
    alone = generate(model, req, parallel_cases.CACHES[cache]).sample
    split = two_processes[f"{name}/{mode}/{cache}"]
    assert split.shape == alone.shape
    error = float((split - alone).norm() / alone.norm())
    print(f"{name} {mode} {cache}: relative error {error:.2e}, largest difference {float((split - alone).abs().max()):.2e} "
          f"(samples up to {float(alone.abs().max()):.1f})")
    assert error <= 1e-5


def test_skip_cache_changes_the_sample_in_both_modes(two_processes):
    for name in parallel_cases.cases():
        for mode in ("cfg", "sequence"):
            assert not torch.allclose(two_processes[f"{name}/{mode}/uncached"], two_processes[f"{name}/{mode}/n2"])
