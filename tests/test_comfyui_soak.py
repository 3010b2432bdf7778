"""A soak through a real ComfyUI server: 30 queued runs with Apply Skip-Cache, each with its own seed, one
of them interrupted mid-run. Every run samples: ComfyUI 0.33's default "RAM pressure" cache answers a prompt
identical to any earlier one from its cache (0.3.64's classic cache only the last one), so no prompt repeats,
and a run whose KSampler the server reports as cached fails the test. After every run the test-only probe route (tests/comfyui_probe) reports
the server's memory: no per-run Skip-Cache object (and so no cached tensor) may be alive between runs,
the tensors the process holds outside ComfyUI's output cache may not grow (0.33's cache keeps every
earlier run's outputs by design: its growth is reported, and bounded by the runs' outputs), and from the second run on (the first loads the model)
the server's resident memory after each run and its peak during each run (reset after each reading)
stay within 2% of the second run's. Skipped unless
COMFYUI_PATH is set (see tests/test_comfyui_integration.py); about 3 minutes on 2 CPU cores.

    COMFYUI_PATH=/path/to/ComfyUI SKIPDIT_SOAK_REPORT=soak.json python -m pytest tests/test_comfyui_soak.py

$SKIPDIT_SOAK_REPORT: a file to write the probe's answer after every run to (the figures docs/comfyui.md
quotes)."""
from __future__ import annotations

import json
import os
import re
import time

import pytest

from comfyui_server import COMFYUI_PATH, Server, error_text, make_base_dir, write_model

pytestmark = pytest.mark.skipif(not COMFYUI_PATH, reason="COMFYUI_PATH is not set")

RUNS, INTERRUPTED, STEPS, LONG_STEPS = 30, 15, 10, 400
MODEL = "latte-soak-pixels-skip.safetensors"
SUMMARY = re.compile(r"Skip-Cache \[[^\]]*\]: (interrupted after )?(\d+) full \+ (\d+) cached of (\d+) steps")


def soak_prompt(seed: int, steps: int) -> dict:
    """Loader -> Apply Skip-Cache (n = 2 over the whole schedule) -> KSampler -> SaveLatent, on 8 frames of
    32 x 32 pixels: the cached deep state (cond and uncond in one batch) is 2 x 8 x 256 tokens x 128 x 4 bytes
    = 2 MiB, so a state kept alive by every run would add 60 MiB (9% of the server) over the soak."""
    return {
        "1": {"class_type": "SkipDiTModelLoader", "inputs": {"checkpoint": MODEL, "weight_dtype": "default"}},
        "2": {"class_type": "SkipDiTClassLabel", "inputs": {"class_label": 1}},
        "3": {"class_type": "SkipDiTEmptyLatteLatent",
              "inputs": {"width": 32, "height": 32, "length": 8, "batch_size": 1, "space": "pixels (3 ch)"}},
        "4": {"class_type": "SkipDiTApplySkipCache", "inputs": {
            "model": ["1", 0], "interval": 2, "settings": "custom", "window_unit": "timesteps", "start": 1000.0,
            "end": 0.0, "depth": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0], "seed": seed, "steps": steps, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["2", 0], "negative": ["2", 1], "latent_image": ["3", 0], "denoise": 1.0}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "latents/soak"}},
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = make_base_dir(tmp_path_factory.mktemp("comfy-soak"), probe=True)
    write_model(base / "models/skipdit" / MODEL, "latte", "Latte-tiny", in_channels=3, skip=True, input_size=32, num_frames=8)
    # glibc moves its mmap threshold up as large blocks are freed, after which freed tensors stay in the
    # heap and resident memory wanders by +-5% from run to run (measured: 557..615 MiB with nothing alive
    # growing). A fixed threshold returns every large block when it is freed, so resident memory follows
    # what is alive, which is what the soak is about.
    with Server(base, env={"MALLOC_MMAP_THRESHOLD_": "131072"}) as srv:
        yield srv


def interrupt_when_sampling(server: Server, prompt_id: str, start: int, steps: int) -> dict:
    progress = re.compile(rf"\b([1-9]\d*)/{steps} \[")
    deadline = time.time() + 120
    while not progress.search(server.log(start)):
        assert time.time() < deadline, server.log(start)[-2000:]
        time.sleep(0.05)
    server.post("/interrupt", {})
    return server.wait(prompt_id, timeout=300)


def test_thirty_runs_leave_no_cached_tensor_and_flat_peak_memory(server):
    server.get("/skipdit_probe/memory?reset_peak=1")  # the peaks that follow are those of the runs
    rows = []
    for i in range(1, RUNS + 1):
        seed = i  # a prompt of its own: a repeated one may be answered from ComfyUI's cache, and nothing samples
        start = len(server.log())
        if i == INTERRUPTED:
            entry = interrupt_when_sampling(server, server.queue(soak_prompt(seed, LONG_STEPS)), start, LONG_STEPS)
            assert entry["status"]["status_str"] == "error" and "execution_interrupted" in error_text(entry)
        else:
            entry = server.wait(server.queue(soak_prompt(seed, STEPS)), timeout=300)
            assert entry["status"]["status_str"] == "success", error_text(entry) + server.log(start)[-2000:]
        cached = [d["nodes"] for event, d in entry["status"]["messages"] if event == "execution_cached"]
        assert cached and "5" not in cached[0], f"run {i}: the server answered KSampler from its cache: {cached}"
        time.sleep(0.2)  # the run's log line follows the node's end
        (summary,) = SUMMARY.findall(server.log(start))
        assert bool(summary[0]) == (i == INTERRUPTED), summary
        probe = server.get("/skipdit_probe/memory?reset_peak=1")
        probe.update(run=i, seed=seed, interrupted=i == INTERRUPTED)
        rows.append(probe)
        if os.environ.get("SKIPDIT_SOAK_REPORT"):
            with open(os.environ["SKIPDIT_SOAK_REPORT"], "w") as f:
                json.dump(rows, f, indent=1)
        assert probe["skip_cache_objects"] == {}, f"run {i}: per-run state alive after the run: {probe}"
        assert probe["skip_cache_tensors"] == 0
    # Run 1 loads the model; from run 2 on nothing may accumulate.
    first, second = rows[0], rows[1]
    for probe in rows[1:]:
        i = probe["run"]
        # the tensors the process holds besides ComfyUI's output cache (the model, ...) do not grow
        outside = lambda p: p["tensor_bytes"] - p["output_cache_tensor_bytes"]  # noqa: E731
        assert outside(probe) <= outside(first) * 1.02, (i, probe, first)
        # what the cache keeps is at most every run's outputs: the sampled latent and its input (3 x 8 x 32 x 32
        # float32 each), no model, no Skip-Cache state
        assert probe["output_cache_tensor_bytes"] - first["output_cache_tensor_bytes"] <= (i - 1) * 2 * 3 * 8 * 32 * 32 * 4, (i, probe)
        assert probe["rss_bytes"] <= second["rss_bytes"] * 1.02, (
            f"the server held {second['rss_bytes'] / 2**20:.1f} MiB after run 2 and {probe['rss_bytes'] / 2**20:.1f} MiB after run {i}")
        assert probe["peak_rss_bytes"] <= second["peak_rss_bytes"] * 1.02, (
            f"the server's peak memory was {second['peak_rss_bytes'] / 2**20:.1f} MiB during run 2 and "
            f"{probe['peak_rss_bytes'] / 2**20:.1f} MiB during run {i}")
