"""Generation end to end on tiny random models: every family samples, Skip-Cache plugs in, the
`skipdit sample` / `bench` commands write files and report statistics."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import randomize
from safetensors.torch import save_file

from skipdit_core.cli import main as cli_main
from skipdit_core.diffusion import make_sampler
from skipdit_core.loading import save_safetensors
from skipdit_core.media import read_video
from skipdit_core.models import build_model, make_config
from skipdit_core.pipeline import Request, generate
from skipdit_core.skip_cache import SkipCacheConfig, simulate

PRESETS = {"dit": "DiT-tiny", "latte": "Latte-tiny", "latte_t2v": "Latte-T2V-tiny", "hunyuan": "HunyuanDiT-tiny"}


def tiny(family, **overrides):
    skip = {} if family == "hunyuan" else {"skip": True}
    config = make_config(family, {**skip, **overrides}, preset=PRESETS[family])
    return randomize(build_model(family, config), seed=5).eval(), config


def text_for(family, config):
    g = torch.Generator().manual_seed(3)
    if family == "latte_t2v":
        return {"prompt_embeds": torch.randn(1, 6, config.caption_channels, generator=g)}
    if family == "hunyuan":
        return {
            "prompt_embeds": torch.randn(1, config.text_len, config.text_states_dim, generator=g),
            "prompt_embeds_2": torch.randn(1, config.text_len_t5, config.text_states_dim_t5, generator=g),
        }
    return {}


def request(family, config, **kw):
    base = dict(label=1 if family in ("dit", "latte") else None, text=text_for(family, config), frames=3, size=8, steps=12, guidance=3.0)
    return Request(family, **{**base, **kw})


@pytest.mark.parametrize("family", list(PRESETS))
def test_every_family_samples_with_and_without_cache(family):
    model, config = tiny(family)
    req = request(family, config)
    plain = generate(model, req)
    again = generate(model, req)
    assert torch.equal(plain.sample, again.sample)  # deterministic for a seed
    assert torch.isfinite(plain.sample).all()
    same = generate(model, req, SkipCacheConfig(interval=1))
    assert torch.equal(plain.sample, same.sample)  # n = 1 is the uncached model, bit for bit
    cached = generate(model, req, SkipCacheConfig(interval=2, start=1000, end=0, depth=1))
    assert cached.stats.cached_steps > 0 and torch.isfinite(cached.sample).all()
    assert not torch.equal(plain.sample, cached.sample)
    # the schedule run is the rule applied to the sampler's timesteps
    timesteps = make_sampler(family, req.sampler, req.steps).timesteps
    expected = simulate(SkipCacheConfig(interval=2, start=1000, end=0, depth=1), timesteps, model.stack.num_units, model.stack.num_skips)
    assert cached.stats.schedule == expected.schedule
    other_seed = generate(model, request(family, config, seed=1))
    assert not torch.equal(plain.sample, other_seed.sample)


def test_class_label_errors():
    model, config = tiny("dit")
    with pytest.raises(ValueError, match="out of range"):
        generate(model, request("dit", config, label=99))
    with pytest.raises(ValueError, match="class-conditional"):
        generate(model, request("dit", config, label=None))


@pytest.fixture
def pixel_latte(tmp_path):
    model, config = tiny("latte", in_channels=3)
    path = tmp_path / "px.safetensors"
    save_safetensors(model.state_dict(), path, "latte", config)
    return path


def test_cli_sample_writes_video_and_reports_cache(pixel_latte, tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    args = [str(pixel_latte), "--label", "2", "--frames", "4", "--steps", "10", "--guidance", "2", "--device", "cpu"]
    assert cli_main(["sample", *args, "--cache-interval", "2", "--cache-start", "1000", "--cache-end", "0", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Skip-Cache n=2 1000->0 k=1" in printed and "cached of 10 steps" in printed
    frames = read_video(str(out))
    assert frames.shape == (4, 8, 8, 3)
    assert cli_main(["sample", *args, "-o", str(tmp_path / "clip.gif")]) == 0
    assert read_video(str(tmp_path / "clip.gif")).shape[0] == 4


def test_cli_sample_takes_empty_steps_and_the_forecast_warmup(pixel_latte, tmp_path, capsys):
    args = [str(pixel_latte), "--label", "2", "--frames", "4", "--steps", "10", "--guidance", "2", "--device", "cpu"]
    assert cli_main(["sample", *args, "--cache-interval", "3", "--cache-start", "1000", "--cache-end", "0", "--cache-forecast",
                     "1", "--cache-empty-steps", "1", "--cache-forecast-warmup", "-o", str(tmp_path / "clip.gif")]) == 0
    printed = capsys.readouterr().out
    assert "Skip-Cache n=3 1000->0 k=1 forecast=1 empty=1 warmup" in printed
    assert "4 full, 6 cached (3 of them empty) of 10 steps" in printed  # F F C E F C E F C E
    assert cli_main(["sample", *args, "--cache-interval", "3", "--cache-empty-steps", "3", "-o", str(tmp_path / "x.gif")]) != 0
    assert "empty steps must be an integer in 0..n-1 = 0..2" in capsys.readouterr().err


def test_cli_bench_json(pixel_latte, capsys):
    args = [str(pixel_latte), "--label", "0", "--frames", "3", "--sampler", "ddim", "--steps", "12", "--device", "cpu"]
    assert cli_main(["bench", *args, "--intervals", "2", "3", "--cache-start", "1000", "--cache-end", "0",
                     "--repeats", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = report["rows"]
    assert report["repeats"] == 2
    assert [r["setting"].split()[0] for r in rows] == ["uncached", "n=2", "n=3"]
    assert rows[1]["cached"] > 0 and rows[2]["cached"] > rows[1]["cached"]
    assert rows[1]["bound"] > 1 and 0 < rows[1]["psnr"] < float("inf") and rows[1]["ssim"] <= 1
    for r in rows[1:]:  # a figure above its bound never goes out without saying it is noise
        assert (r["warning"] is not None) == (r["speedup"] > r["bound"])


def test_bench_times_the_fastest_of_alternating_runs_and_flags_speedups_above_the_bound(pixel_latte, monkeypatch, capsys):
    """The timing rule with a scripted clock: warm-up first, settings alternate, the fastest run
    of each is kept, and a speedup above the bound is printed with a warning."""
    import skipdit_core.pipeline as pipeline

    real, order = pipeline.generate, []
    fake_seconds = {None: [9.0, 4.0], 2: [5.0, 1.0]}  # uncached: slow first round; n=2: too fast in round 2

    def scripted(model, req, cache=None, progress=None):
        res = real(model, req, cache)
        key = None if cache is None else cache.interval
        if req.steps == 2 and cache is None and not order:
            order.append("warm-up")
            return res
        order.append(key)
        res.seconds = fake_seconds[key].pop(0)
        return res

    monkeypatch.setattr(pipeline, "generate", scripted)
    args = [str(pixel_latte), "--label", "0", "--frames", "3", "--sampler", "ddim", "--steps", "8", "--device", "cpu",
            "--intervals", "2", "--cache-start", "1000", "--cache-end", "0", "--repeats", "2"]
    assert cli_main(["bench", *args]) == 0
    assert order == ["warm-up", None, 2, None, 2]
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("n=2"))
    assert " 4.00x" in row and row.endswith(" *")  # 4.0 s / 1.0 s, above a bound of < 2
    assert "* n=2 1000->0 k=1: measured 4.00x is above the bound" in out and "timing noise" in out


def test_cli_image_png_and_latent_without_vae(tmp_path, capsys):
    model, config = tiny("dit", in_channels=3)
    path = tmp_path / "dit.safetensors"
    save_safetensors(model.state_dict(), path, "dit", config)
    assert cli_main(["sample", str(path), "--label", "1", "--steps", "5", "--device", "cpu", "-o", str(tmp_path / "img.png")]) == 0
    assert (tmp_path / "img.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    latent, lconfig = tiny("dit")
    save_safetensors(latent.state_dict(), tmp_path / "lat.safetensors", "dit", lconfig)
    assert cli_main(["sample", str(tmp_path / "lat.safetensors"), "--label", "1", "--steps", "5", "--device", "cpu", "-o", str(tmp_path / "x.png")]) == 0
    assert "no --vae was given" in capsys.readouterr().out and (tmp_path / "x.latents.safetensors").exists()


def test_cli_text_embeddings_file(tmp_path, capsys):
    model, config = tiny("latte_t2v")
    path = tmp_path / "t2v.safetensors"
    save_safetensors(model.state_dict(), path, "latte_t2v", config)
    emb = tmp_path / "prompt.safetensors"
    save_file(text_for("latte_t2v", config), str(emb))
    assert cli_main(["sample", str(path), "--text-embeddings", str(emb), "--frames", "2", "--size", "8", "--sampler", "ddim",
                     "--steps", "4", "--guidance", "7.5", "--cache-interval", "2", "--device", "cpu", "-o", str(tmp_path / "v.mp4")]) == 0
    assert "latents" in capsys.readouterr().out  # a latent model: written as latents without a VAE
    bad = tmp_path / "empty.safetensors"
    save_file({"something": torch.zeros(1)}, str(bad))
    assert cli_main(["sample", str(path), "--text-embeddings", str(bad), "--steps", "2", "--device", "cpu"]) == 2
    assert "has no 'prompt_embeds'" in capsys.readouterr().err


def test_cli_decodes_latents_through_a_local_vae(tmp_path, capsys):
    diffusers = pytest.importorskip("diffusers")
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), layers_per_block=1,
        norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )
    vae.save_pretrained(tmp_path / "vae")
    model, config = tiny("latte")
    path = tmp_path / "latte.safetensors"
    save_safetensors(model.state_dict(), path, "latte", config)
    out = tmp_path / "decoded.mp4"
    assert cli_main(["sample", str(path), "--label", "1", "--frames", "2", "--steps", "3", "--vae", str(tmp_path / "vae"),
                     "--device", "cpu", "-o", str(out)]) == 0
    assert read_video(str(out)).shape == (2, 16, 16, 3)  # 8x8 latents, VAE upsamples 2x


def test_pixel_space_models_sample_with_x0_clamped_to_the_data_range():
    # A random model predicts wild x0 early on; in pixel space the sampler clamps it (the last DDIM step
    # lands on x0 itself), latents are left alone, and the request can say otherwise.
    pixel, _ = tiny("latte", in_channels=3)
    latent, _ = tiny("latte")
    for sampler in ("ddim", "ddpm"):
        req = Request("latte", label=1, frames=2, size=8, sampler=sampler, steps=6, guidance=3.0)
        assert generate(pixel, req).sample.abs().max() <= 1.0
        unclamped = generate(pixel, Request(**{**req.__dict__, "clip_denoised": False})).sample
        assert unclamped.abs().max() > 1.0
        assert generate(latent, req).sample.abs().max() > 1.0


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_exact_denoiser_samples_a_training_clip(prediction):
    """With the exact posterior denoiser of a finite data set, DDIM ends on one of its clips, for an
    eps and for a v prediction (Latte layout, learned-variance channels, x0 clamped as for pixels)."""
    g = torch.Generator().manual_seed(0)
    data = (torch.rand(6, 2, 3, 4, 4, generator=g) > 0.5).double() * 2 - 1  # (K, F, C, H, W)
    sampler = make_sampler("latte", "ddim", 25, clip_denoised=True, prediction=prediction)
    ac = sampler.schedule.alphas_cumprod

    def denoise(x, t):
        a = ac[int(t[0])]
        d = ((x.double()[:, None] - a.sqrt() * data[None]) ** 2).flatten(2).sum(-1)
        x0 = torch.einsum("bk,k...->b...", torch.softmax(-d / (2 * (1 - a)), dim=1), data)
        eps = (x.double() - a.sqrt() * x0) / (1 - a).sqrt()
        out = eps if prediction == "eps" else a.sqrt() * eps - (1 - a).sqrt() * x0
        return torch.cat([out, torch.zeros_like(out)], dim=2).float()

    out = sampler.sample(denoise, (3, 2, 3, 4, 4), 0)
    nearest = ((out.double()[:, None] - data[None]) ** 2).flatten(2).mean(-1).min(1).values
    assert nearest.max() < 1e-6


def test_v_prediction_is_read_from_the_model_config(tmp_path):
    config = make_config("latte", dict(in_channels=3, input_size=8, patch_size=4, num_frames=2, num_classes=2, depth=4,
                                       hidden_size=32, num_heads=2, prediction="v"))
    model = randomize(build_model("latte", config), seed=1).eval()
    save_safetensors(model.state_dict(), tmp_path / "v.safetensors", "latte", config)
    from skipdit_core.loading import load_model

    loaded, ckpt = load_model(tmp_path / "v.safetensors")
    assert ckpt.config.prediction == "v" and loaded.config.prediction == "v"
    req = Request("latte", label=1, frames=2, size=8, sampler="ddim", steps=5, guidance=2.0)
    as_v = generate(loaded, req).sample
    loaded.config.prediction = "eps"  # the same weights read as eps give another sample
    assert not torch.allclose(as_v, generate(loaded, req).sample)
    with pytest.raises(ValueError, match="prediction must be 'eps' or 'v'"):
        build_model("latte", make_config("latte", dict(prediction="x0", depth=4)))


def test_cli_presets_replace_the_cache_options_and_bench_compares_them(pixel_latte, tmp_path, capsys):
    from skipdit_core.skip_cache_presets import PRESETS

    args = [str(pixel_latte), "--label", "2", "--frames", "4", "--steps", "10", "--guidance", "2", "--device", "cpu"]
    assert cli_main(["sample", *args, "--cache-preset", "2x", "-o", str(tmp_path / "a.mp4")]) == 0
    assert f"Skip-Cache {PRESETS[('latte', True)]['2x'].describe()}:" in capsys.readouterr().out
    assert cli_main(["bench", *args, "--presets", "1.5x", "4x", "--repeats", "1", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["setting"] for r in rows] == ["uncached"] + [PRESETS[("latte", True)][n].describe() for n in ("1.5x", "4x")]
