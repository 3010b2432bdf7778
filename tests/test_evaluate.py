"""`skipdit evaluate`: FID / FVD of sample-many outputs against a reference set. The distances against
torchmetrics' FID and StyleGAN-V's FVD formula (written again here in numpy + scipy); clear lines for bad network
files; end to end with tiny random networks saved as TorchScript files that have the real files' call conventions
(loaded exactly as inception-2015-12-05.pt and i3d_torchscript.pt are), the feature cache reused and a partial one
continued; 2 gloo processes under torch.distributed.run equal to one."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import randomize
from skipdit_core import evaluate as ev
from skipdit_core import models
from skipdit_core.cli import main
from skipdit_core.loading import save_safetensors
from skipdit_core.media import read_video, write_video

ROOT = Path(__file__).resolve().parents[1]
# the feature networks people have are TorchScript files: written and read here as they are (torch.jit is deprecated)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")
FRAMES = 4  # the tiny Latte's clips; the real FVD takes 16


class TinyInception(nn.Module):
    """The call convention of NVIDIA's inception-2015-12-05.pt: uint8 (N, 3, H, W) at any size, resized inside,
    (x - 128) / 128, 2048 features with return_features=True."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, stride=2)
        self.proj = nn.Linear(32, 2048)

    def forward(self, img, return_features: bool = False, use_fp16: bool = False, no_output_bias: bool = False):
        x = F.interpolate(img.to(torch.float32), size=(16, 16), mode="bilinear", align_corners=False)  # the real: 299
        features = self.proj(torch.tanh(self.conv((x - 128) / 128)).mean(dim=(2, 3)))
        return features if return_features else features.softmax(dim=1)


class TinyI3D(nn.Module):
    """The call convention of StyleGAN-V's i3d_torchscript.pt: (N, 3, T, H, W), rescale / resize / return_features."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(3, 32, 3, stride=(1, 2, 2))
        self.proj = nn.Linear(32, 400)

    def forward(self, x, rescale: bool = False, resize: bool = False, return_features: bool = False):
        x = x.to(torch.float32)
        if rescale:
            x = x / 127.5 - 1
        if resize:
            x = F.interpolate(x, size=(x.shape[2], 16, 16), mode="trilinear", align_corners=False)  # the real: 224
        features = self.proj(torch.tanh(self.conv(x)).mean(dim=(2, 3, 4)))
        return features if return_features else features.softmax(dim=1)


def stylegan_v_fvd(generated: np.ndarray, real: np.ndarray) -> float:
    """StyleGAN-V's compute_fvd on features: FeatureStats' float64 mean / biased covariance, scipy's sqrtm."""
    import scipy.linalg

    def mean_cov(x):
        x = x.astype(np.float64)
        mean = x.sum(axis=0) / len(x)
        return mean, x.T @ x / len(x) - np.outer(mean, mean)

    mu_gen, sigma_gen = mean_cov(generated)
    mu_real, sigma_real = mean_cov(real)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a singular product (fewer samples than features): scipy warns
        s = scipy.linalg.sqrtm(np.dot(sigma_gen, sigma_real))
    return float(np.real(np.square(mu_gen - mu_real).sum() + np.trace(sigma_gen + sigma_real - s * 2)))


def torchmetrics_fid(generated: np.ndarray, real: np.ndarray) -> float:
    """torchmetrics' FrechetInceptionDistance fed these features through an identity feature module."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Given(nn.Module):
        num_features = generated.shape[1]

        def forward(self, x):
            return x

    metric = FrechetInceptionDistance(feature=Given())
    metric.update(torch.from_numpy(real.astype(np.float64)), real=True)
    metric.update(torch.from_numpy(generated.astype(np.float64)), real=False)
    return float(metric.compute())


def features(seed: int, n: int, d: int) -> np.ndarray:
    g = np.random.default_rng(seed)
    return (g.normal(size=(n, d)) @ g.normal(size=(d, d)) / np.sqrt(d) + g.normal(size=d)).astype(np.float32)


# ----------------------------------------------------------------------------- the distances


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models and 400 x 400 matrices on a shared 2-core machine: threads only contend (OpenBLAS's spinning
    threads made scipy's sqrtm 60x slower here). torch's threads, and numpy's / scipy's OpenBLAS through
    threadpoolctl when installed, else through the C function each OpenBLAS build exports."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    restore = _one_blas_thread()
    yield
    restore()
    torch.set_num_threads(before)


def _one_blas_thread():
    """Set the OpenBLAS libraries numpy and scipy loaded to 1 thread; returns what undoes it."""
    try:
        from threadpoolctl import threadpool_limits

        limits = threadpool_limits(1)
        return limits.restore_original_limits
    except ImportError:
        pass
    import ctypes
    import re

    try:
        import scipy.linalg  # noqa: F401 - loads scipy's own OpenBLAS
    except ImportError:
        pass
    maps = Path("/proc/self/maps")
    undo = []
    for lib in sorted(set(re.findall(r"/\S*openblas\S*\.so\S*", maps.read_text()))) if maps.exists() else []:
        handle = ctypes.CDLL(lib)
        for prefix in ("scipy_openblas", "openblas"):
            for suffix in ("", "64_"):
                get = getattr(handle, f"{prefix}_get_num_threads{suffix}", None)
                set_ = getattr(handle, f"{prefix}_set_num_threads{suffix}", None)
                if get is not None and set_ is not None:
                    undo.append((set_, get()))
                    set_(1)
    return lambda: [set_(n) for set_, n in undo]


@pytest.mark.parametrize("n_gen, n_ref, d", [(150, 120, 64), (20, 30, 64)])  # more samples than features, and fewer
def test_fid_equals_torchmetrics_on_the_same_features(n_gen, n_ref, d):
    gen, ref = features(1, n_gen, d), features(2, n_ref, d) + 0.3
    ours, theirs = ev.fid(gen, ref), torchmetrics_fid(gen, ref)
    assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-6)
    assert ev.fid(gen, gen) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("n_gen, n_ref", [(600, 500), (60, 50)])
def test_fvd_equals_stylegan_v_formula_to_1e_4(n_gen, n_ref):
    pytest.importorskip("scipy")
    gen, ref = features(3, n_gen, 400), features(4, n_ref, 400) * 1.1
    ours, theirs = ev.fvd(gen, ref), stylegan_v_fvd(gen, ref)
    assert abs(ours - theirs) <= 1e-4, (ours, theirs)


def test_matrix_square_root_and_a_known_distance():
    g = np.random.default_rng(0)
    q, _ = np.linalg.qr(g.normal(size=(6, 6)))
    values = np.array([4.0, 2.25, 1.0, 0.25, 0.0, 9.0])  # one zero: positive semi-definite
    root = ev.psd_sqrt(q @ np.diag(values) @ q.T)
    np.testing.assert_allclose(root, q @ np.diag(np.sqrt(values)) @ q.T, atol=1e-12)
    # diagonal covariances commute: tr (S1 S2)^(1/2) = sum sqrt(a_i b_i), so the distance is |mu|^2 + sum (sqrt a - sqrt b)^2
    a, b, mu = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.0]), np.array([1.0, 2.0, 0.5])
    expected = np.square(mu).sum() + np.square(np.sqrt(a) - np.sqrt(b)).sum()
    assert ev.frechet_distance(mu, np.diag(a), np.zeros(3), np.diag(b)) == pytest.approx(expected, abs=1e-12)


# ----------------------------------------------------------------------------- files for the command


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("evaluate")
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(TinyInception().eval()), str(root / "inception-2015-12-05.pt"))
    torch.jit.save(torch.jit.script(TinyI3D().eval()), str(root / "i3d_torchscript.pt"))
    for family, preset in (("latte", "Latte-tiny"), ("dit", "DiT-tiny")):
        config = models.make_config(family, {"in_channels": 3, "skip": True}, preset=preset)
        save_safetensors(randomize(models.build_model(family, config), seed=1).state_dict(), root / f"{family}.safetensors",
                         family, config)
        intervals = ["1", "2"] if family == "latte" else ["1"]
        assert main(["sample-many", str(root / f"{family}.safetensors"), "--num-samples", "6", "--labels", "all",
                     "--out", str(root / f"{family}-out"), "--sampler", "ddim", "--steps", "4", "--guidance", "3",
                     "--batch-size", "2", "--cache-intervals", *intervals, "--cache-start", "1000", "--cache-end", "0",
                     "--no-progress", "--device", "cpu"]) == 0
    g = np.random.default_rng(0)
    videos = root / "reference-videos"
    for i in range(7):  # in a class subfolder, as UCF101's
        write_video(str(videos / "class-a" / f"v{i}.mp4"), torch.from_numpy(g.uniform(-1, 1, (6, 3, 8, 8)).astype(np.float32)))
    write_video(str(videos / "short.mp4"), torch.zeros(2, 3, 8, 8))  # fewer than FRAMES frames: discarded
    images = g.integers(0, 256, (9, 8, 8, 3), dtype=np.uint8)
    np.savez(root / "reference-images.npz", arr_0=images)
    return {"root": root, "inception": root / "inception-2015-12-05.pt", "i3d": root / "i3d_torchscript.pt",
            "videos_out": root / "latte-out", "images_out": root / "dit-out", "ref_videos": videos,
            "ref_images": root / "reference-images.npz", "images": images}


@pytest.fixture
def counted(monkeypatch) -> list:
    """Items run through a feature network, per call."""
    calls = []
    real = ev.network_features

    def counting(net, batch):
        calls.append(len(batch))
        return real(net, batch)

    monkeypatch.setattr(ev, "network_features", counting)
    return calls


def run_network(path: Path, batch: np.ndarray, fvd: bool) -> np.ndarray:
    """The documented call, done here by hand."""
    net = torch.jit.load(str(path))
    x = torch.from_numpy(batch)
    with torch.no_grad():
        if fvd:
            return net(x.permute(0, 4, 1, 2, 3).float() / 127.5 - 1, rescale=False, resize=True, return_features=True).numpy()
        return net(x.permute(0, 3, 1, 2), return_features=True).numpy()


def fvd_command(files, cache: Path, *extra) -> list[str]:
    return ["evaluate", str(files["videos_out"]), "--reference", str(files["ref_videos"]), "--i3d", str(files["i3d"]),
            "--frames", str(FRAMES), "--batch-size", "3", "--cache-dir", str(cache), "--no-progress", *extra]


# ----------------------------------------------------------------------------- end to end


def test_fvd_end_to_end_then_from_the_cache(files, tmp_path, capsys, counted):
    cache = tmp_path / "cache"
    assert main(fvd_command(files, cache)) == 0
    out = capsys.readouterr().out
    # the reference once (7 usable videos: the short one is read, never run), each of the 2 settings' 6 samples once
    assert sum(counted) == 7 + 6 + 6
    assert "1 shorter than 4 frames discarded" in out and "uncached" in out and "n2_1000-0_k1" in out
    report = json.loads((files["videos_out"] / "evaluation-fvd.json").read_text())
    assert report["metric"] == "fvd" and report["frames"] == FRAMES and report["reference"]["items"] == 7
    assert [r["setting"] for r in report["results"]] == ["uncached", "n2_1000-0_k1"]

    # the same numbers by hand: frames read with PyAV / from the .npz, the documented call, StyleGAN-V's formula
    refs = [read_video(str(p))[:FRAMES] for p in sorted(files["ref_videos"].rglob("*.mp4"))]
    ref = run_network(files["i3d"], np.stack([v for v in refs if len(v) == FRAMES]), fvd=True)
    for row in report["results"]:
        with np.load(files["videos_out"] / f"{row['setting']}.npz") as npz:
            gen = run_network(files["i3d"], npz["arr_0"], fvd=True)
        assert row["fvd"] == pytest.approx(stylegan_v_fvd(gen, ref), rel=1e-5)
    assert report["results"][0]["fvd"] != report["results"][1]["fvd"]

    counted.clear()
    assert main(fvd_command(files, cache)) == 0
    assert counted == []  # nothing re-extracted: every set from its cache
    assert capsys.readouterr().out.count("features from cache") == 3
    again = json.loads((files["videos_out"] / "evaluation-fvd.json").read_text())
    assert [r["fvd"] for r in again["results"]] == [r["fvd"] for r in report["results"]]


def test_fid_end_to_end_images_npz_and_folder(files, tmp_path, capsys, counted):
    Image = pytest.importorskip("PIL.Image")
    folder = tmp_path / "reference-pngs"
    folder.mkdir()
    for i, image in enumerate(files["images"]):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    samples = files["images_out"] / "uncached.npz"
    args = ["--inception", str(files["inception"]), "--no-progress", "-o", str(tmp_path / "fid.json")]
    assert main(["evaluate", str(samples), "--reference", str(files["ref_images"]), *args]) == 0  # cache beside the sets
    from_npz = json.loads((tmp_path / "fid.json").read_text())
    assert sum(counted) == 9 + 6
    assert list(files["ref_images"].parent.glob("reference-images.fid-*.npz"))  # beside the reference
    assert list(files["images_out"].glob("uncached.fid-*.npz"))  # beside the samples

    counted.clear()
    assert main(["evaluate", str(samples), "--reference", str(folder), *args]) == 0
    assert sum(counted) == 9  # a new reference; the samples' features came from their cache
    from_folder = json.loads((tmp_path / "fid.json").read_text())
    assert from_folder["results"][0]["fid"] == from_npz["results"][0]["fid"]  # PNG is lossless: the same features

    with np.load(samples) as npz:
        gen = run_network(files["inception"], npz["arr_0"], fvd=False)
    ref = run_network(files["inception"], files["images"], fvd=False)
    assert from_npz["results"][0]["fid"] == pytest.approx(torchmetrics_fid(gen, ref), rel=1e-5)
    assert "FID against" in capsys.readouterr().out


def test_a_partial_cache_is_continued(files, tmp_path, monkeypatch):
    reference = ev.open_set(files["ref_videos"])
    net = ev.Network.of("fvd", str(files["i3d"]), "cpu")
    whole = ev.set_features(reference, net, FRAMES, 3, tmp_path / "whole").features

    class Killed(Exception):
        pass

    real, seen = ev.network_features, []

    def dies_on_the_second_chunk(n, batch):
        if seen:
            raise Killed
        seen.append(len(batch))
        return real(n, batch)

    monkeypatch.setattr(ev, "network_features", dies_on_the_second_chunk)
    with pytest.raises(Killed):
        ev.set_features(reference, net, FRAMES, 3, tmp_path / "cut")
    parts = list((tmp_path / "cut").glob(".*.parts/*.npy"))
    assert [p.name for p in parts] == ["000000000-000000003.npy"]
    monkeypatch.setattr(ev, "network_features", real)
    resumed = ev.set_features(reference, net, FRAMES, 3, tmp_path / "cut")
    assert (resumed.from_partial, resumed.extracted_now) == (3, 5)  # chunks [3, 6) and [6, 8) only
    np.testing.assert_array_equal(resumed.features, whole)
    assert not list((tmp_path / "cut").glob(".*.parts"))  # joined into the cache, parts removed


def test_two_gloo_processes_equal_one(files, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    reports = {}
    for processes in (1, 2):
        prefix = [sys.executable] if processes == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
        out = tmp_path / f"p{processes}.json"
        done = subprocess.run(prefix + ["-m", "skipdit_core"] + fvd_command(files, tmp_path / f"cache{processes}", "-o", str(out)),
                              capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
        assert done.stdout.count("wrote ") == 1  # the main process reports, once
        reports[processes] = json.loads(out.read_text())
    assert reports[2]["processes"] == 2
    assert [r["fvd"] for r in reports[2]["results"]] == [r["fvd"] for r in reports[1]["results"]]
    for one in sorted((tmp_path / "cache1").glob("*.npz")):
        with np.load(one) as a, np.load(tmp_path / "cache2" / one.name) as b:  # same key, same features, bit for bit
            np.testing.assert_array_equal(a["features"], b["features"])


# ----------------------------------------------------------------------------- clear lines


def test_missing_or_wrong_network_files_get_one_line_naming_them(files, tmp_path, capsys):
    torch.save({"weight": torch.zeros(3)}, tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    torch.jit.save(torch.jit.trace(nn.Linear(3, 4), torch.zeros(1, 3)), str(tmp_path / "linear.pt"))

    class Short(nn.Module):  # the I3D convention, 10 features instead of 400
        def forward(self, x, rescale: bool = False, resize: bool = False, return_features: bool = False):
            return x.flatten(1)[:, :10]

    torch.jit.save(torch.jit.script(Short()), str(tmp_path / "short.pt"))
    images = ["evaluate", str(files["images_out"]), "--reference", str(files["ref_images"]), "--cache-dir", str(tmp_path)]
    videos = fvd_command(files, tmp_path)
    cases = [
        (videos + ["--i3d", str(tmp_path / "missing.pt")], ["missing.pt: no such file", "i3d_torchscript.pt"]),
        (images + ["--inception", str(tmp_path / "pt_inception-2015-12-05-6726825d.pth")],
         ["6726825d.pth: a state dict", "not a TorchScript file", "inception-2015-12-05.pt"]),
        (videos + ["--i3d", str(tmp_path / "linear.pt")],
         ["linear.pt: its forward takes (input), without rescale, resize, return_features"]),
        (videos + ["--i3d", str(tmp_path / "short.pt")], ["short.pt: returned (3, 10) for 3 items, expected (3, 400)"]),
        (videos + ["--i3d", str(files["inception"])], ["inception-2015-12-05.pt: its forward takes (img, return_features"]),
        (images[:4], ["FID needs --inception PATH", "nothing is downloaded"]),
        (["evaluate", str(files["images_out"]), "--reference", str(files["ref_videos"]), "--inception", str(files["inception"])],
         ["uncached.npz holds images, the reference", "reference-videos videos"]),
    ]
    for argv, expected in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("skipdit: error: "), err
        for part in expected:
            assert part in err, (part, err)


def test_sets_that_cannot_be_measured(tmp_path, monkeypatch):
    np.savez(tmp_path / "latents.npz", arr_0=np.zeros((2, 4, 8, 8), np.float32))
    with pytest.raises(ev.EvaluationError, match=r"latents.npz: float32 values, expected uint8 frames"):
        ev.open_set(tmp_path / "latents.npz")
    (tmp_path / "pngs").mkdir()
    (tmp_path / "pngs" / "a.png").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "PIL", None)  # Pillow not installed
    with pytest.raises(ev.EvaluationError, match=r"reading images \(.*a.png\) needs Pillow: pip install pillow"):
        ev.open_set(tmp_path / "pngs")
