"""The benchmark scripts run end to end on tiny models (their figures come from real runs, see docs/benchmarks.md)."""
import json
import os
import subprocess
import sys

import pytest

from helpers import randomize

from skipdit_core.loading import save_safetensors
from skipdit_core.models import build_model, make_config
from skipdit_core.skip_branches import branch_parameters

ROOT = os.path.join(os.path.dirname(__file__), "..")


def run(script, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_speed_reports_each_setting_against_uncached():
    data = json.loads(run("speed.py", "--family", "dit", "--preset", "DiT-tiny", "--size", "8", "--steps", "10",
                          "--intervals", "2", "3", "--windows", "700:50", "1000:0", "--depth", "1", "--json"))
    rows = data["rows"]
    assert [(r["interval"], r["window"]) for r in rows] == [(1, "-"), (2, "700->50"), (3, "700->50"), (2, "1000->0")]
    assert {r["forecast"] for r in rows} == {0}
    assert rows[0]["speedup"] == 1.0 and rows[0]["cached"] == 0 and rows[0]["bound"] == 1.0
    for r in rows[1:]:
        assert r["cached"] > 0 and r["full"] + r["cached"] == 10 and r["bound"] > 1.0 and r["seconds"] > 0


def test_fidelity_compares_skip_cache_and_every_peer(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("diffusers.hooks.first_block_cache")
    paths = {}
    for skip in (True, False):
        config = make_config("latte", dict(in_channels=3, input_size=8, patch_size=4, num_frames=4, num_classes=4,
                                           depth=8, hidden_size=32, num_heads=2, skip=skip))
        paths[skip] = tmp_path / f"{skip}.safetensors"
        save_safetensors(randomize(build_model("latte", config), seed=4).state_dict(), paths[skip], "latte", config)
    out = run("fidelity.py", "--model", str(paths[True]), "--twin", str(paths[False]), "--classes", "1",
              "--seeds", "0", "--steps", "6", "--intervals", "2", "--windows", "1000:0", "700:50", "--repeats", "1",
              "--forecasts", "0", "2", "--empty", "--skip-peers", "taylorseer", "--out", str(tmp_path))
    table = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    methods = {line.split(" | ")[0][2:] for line in table}
    assert methods == {"Skip-Cache", "Skip-Cache + forecast 2", "Skip-Cache + forecast 2, empty steps", "First Block Cache",
                       "PAB", "FasterCache", "TaylorSeer", "MagCache", "cache-dit DBCache", "Spectrum",
                       "TaylorSeer (skip model)"}
    assert "| n=2 1000->0 forecast 2 empty 1 warmup |" in out
    assert "At equal measured speedup, Skip-Cache, reuse (the paper)" in out
    assert "At equal share of block compute (the machine-independent axis), Skip-Cache, any forecast order" in out
    assert "Skip-Cache, any setting (forecast, empty steps, warm-up) against the peers" in out
    assert (tmp_path / "fidelity-vs-speedup.png").stat().st_size > 10_000
    assert (tmp_path / "fidelity-vs-compute.png").stat().st_size > 10_000


def test_claim_check_takes_the_best_skip_cache_setting_at_least_as_fast():
    pytest.importorskip("diffusers", minversion="0.42")
    from benchmarks.fidelity import equal_speedup_check

    skip = [{"setting": "a", "speedup": 1.2, "compute": 0.8, "psnr": 40.0},
            {"setting": "b", "speedup": 1.5, "compute": 0.6, "psnr": 30.0},
            {"setting": "c", "speedup": 1.6, "compute": 0.7, "psnr": 33.0}]
    peer = [{"method": "P", "setting": "mild", "speedup": 1.1, "compute": 0.9, "psnr": 41.0},
            {"method": "P", "setting": "mid", "speedup": 1.4, "compute": 0.65, "psnr": 31.0},
            {"method": "P", "setting": "fast", "speedup": 1.8, "compute": 0.5, "psnr": 20.0}]
    by_speed = equal_speedup_check(skip, peer, "speedup")
    assert "Skip-Cache a (1.20x) 40.00 dB -> peer closer" in by_speed[0]  # best of all three, still below 41
    assert "Skip-Cache c (1.60x) 33.00 dB -> Skip-Cache closer" in by_speed[1]  # a is too slow, c beats b
    assert "no comparison" in by_speed[2]
    by_compute = equal_speedup_check(skip, peer, "compute")
    assert "Skip-Cache a (80% compute)" in by_compute[0]
    assert "Skip-Cache b (60% compute) 30.00 dB -> peer closer" in by_compute[1]  # c uses more compute
    assert "no comparison" in by_compute[2]
    # with SSIM measured, closer means both; a rival closer on both is preferred to a higher-PSNR one
    skip = [{"setting": "x", "speedup": 1.5, "compute": 0.6, "psnr": 35.0, "ssim": 0.90},
            {"setting": "y", "speedup": 1.5, "compute": 0.6, "psnr": 33.0, "ssim": 0.97}]
    peer = [{"method": "P", "setting": "p", "speedup": 1.4, "compute": 0.7, "psnr": 32.0, "ssim": 0.95},
            {"method": "P", "setting": "q", "speedup": 1.4, "compute": 0.7, "psnr": 34.0, "ssim": 0.98}]
    lines = equal_speedup_check(skip, peer, "compute")
    assert "Skip-Cache y (60% compute) 33.00 dB, SSIM 0.9500 vs 0.9700 -> Skip-Cache closer" in lines[0]
    assert "Skip-Cache x (60% compute) 35.00 dB, SSIM 0.9800 vs 0.9000 -> split (PSNR: Skip-Cache, SSIM: peer)" in lines[1]


def test_fidelity_reports_the_mean_compute_over_trajectories(monkeypatch):
    """A peer whose block compute depends on the content (First Block Cache, cache-dit) runs a different share on
    each trajectory: the row gives their mean, not the last trajectory's."""
    pytest.importorskip("diffusers", minversion="0.42")
    import contextlib
    import types

    import benchmarks.fidelity as fidelity

    shares = iter([0.4, 0.6] * len(fidelity.PEERS["fbcache"][1]))

    @contextlib.contextmanager
    def fake_peer(model, method, **params):
        yield types.SimpleNamespace(compute_fraction=next(shares))

    class TwoTrajectories:
        model, requests = None, [None]

        def compare(self, run):
            run("first")
            run("second")
            return {"psnr": 30.0, "ssim": 0.9, "speedup": 1.5, "lpips": float("nan")}

    monkeypatch.setattr(fidelity, "peer_cache", fake_peer)
    monkeypatch.setattr(fidelity, "generate", lambda model, req, cache=None: None)
    rows = fidelity.peer_rows(TwoTrajectories(), ["fbcache"])
    assert [r["compute"] for r in rows] == pytest.approx([0.5] * len(rows))


def test_gpu_script_dry_mode_runs(tmp_path):
    """benchmarks/gpu.py --dry: every family's speed and peak-share rows, sample-many's two rows, the peak check
    skipped with its reason, written to --out and never to docs/."""
    docs = os.path.join(ROOT, "docs", "gpu.md")
    before = os.stat(docs).st_mtime_ns if os.path.exists(docs) else None
    out = tmp_path / "gpu.md"
    printed = run("gpu.py", "--dry", "--out", str(out))
    text = out.read_text()
    assert text in printed
    assert (os.stat(docs).st_mtime_ns if os.path.exists(docs) else None) == before
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    presets = {"dit": "DiT-tiny", "latte": "Latte-tiny", "latte_t2v": "Latte-T2V-tiny", "hunyuan": "HunyuanDiT-tiny",
               "wan": "tiny"}
    for family, preset in presets.items():
        settings = [r[2] for r in rows if r[0] == f"| {family}" and len(r) == 8]
        assert settings[0] == "uncached" and len(settings) == 3, (family, settings)
        assert settings[1].startswith("n=2 ") and settings[2] == "n=3 1000->0 forecast 1 damping 0.7"
        share = [r for r in rows if r[0] == f"| {family}" and len(r) == 6]
        assert len(share) == 1 and share[0][1] == f"{preset}, tiny" and float(share[0][4]) > 0, share
    assert [r[0] for r in rows if r[0] in ("| uncached", "| n=2 900->50")] == ["| uncached", "| n=2 900->50"]
    assert all(float(r[4]) > 0 for r in rows if r[0] in ("| uncached", "| n=2 900->50"))
    assert "Peak check: skipped (dry run" in text and "PASS" not in text and "FAIL" not in text
    # one stage-1 step of the Skip-Wan conversion: only the branches train, a time, a finite loss
    (stage1,) = [r for r in rows if r[0].startswith("| Wan 2.1 tiny + 1 skips (residual)")]
    assert int(stage1[2].replace(",", "")) == branch_parameters(1, 64) and float(stage1[3]) > 0, stage1
    assert stage1[5] == "yes |", stage1


def test_gpu_flop_count_by_hand():
    from benchmarks.gpu import block_flops, model_flops

    # D = 8, T = 4, 2 heads, MLP 32: projections 8*4*64 = 2048, attention 4*4*4*8 = 512, MLP 4*4*8*32 = 4096
    assert block_flops(8, 4, 2) == 2048 + 512 + 4096
    # attending within 2-token groups: 4*4*2*8 = 256; 3 text tokens: 4*4*64 + 4*3*64 + 4*4*3*8 = 1024 + 768 + 384
    assert block_flops(8, 4, 2, attn_len=2) == 2048 + 256 + 4096
    assert block_flops(8, 4, 2, text_tokens=3) == 6656 + 2176
    with pytest.raises(ValueError):
        block_flops(8, 4, 3)
    # DiT-XL/2 at 256^2, one sample: 28 blocks of D = 1152 on 256 tokens (docs/sampling-at-scale.md: 0.47 TFLOP
    # per step with the 2 CFG rows)
    config = make_config("dit", preset="DiT-XL/2")
    d, t = 1152, 256
    assert model_flops("dit", config, 1, 32) == 28 * (24 * t * d * d + 4 * t * t * d)
    assert 2 * model_flops("dit", config, 1, 32) / 1e12 == pytest.approx(0.4735, abs=1e-4)
