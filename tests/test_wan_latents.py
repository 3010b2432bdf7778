"""The Wan data path on tiny random models built offline: `training.precompute_latents` with a diffusers
AutoencoderKLWan (a pipeline folder's vae/): shapes, the per-channel normalisation WanPipeline undoes before decoding,
frame-count and image handling, non-square clips; and videos + captions -> `skipdit encode-text --family wan`
sidecars -> Wan latents -> 2 steps of the Wan conversion recipe on that folder."""
import json
import os

import pytest
import torch
import yaml

diffusers = pytest.importorskip("diffusers", reason="precompute_latents needs diffusers")
pytest.importorskip("accelerate", reason="training needs accelerate: pip install -e .[train]")

from helpers import randomize  # noqa: E402
from skipdit_core import models  # noqa: E402
from skipdit_core.loading import load_model, save_safetensors  # noqa: E402
from test_training_data import write_video  # noqa: E402
from training.config import from_dict  # noqa: E402
from training.data import LatentFolder, MovingShapes, VideoFolder, build_dataset, precompute_latents  # noqa: E402
from training.train import train  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEAN, STD = [0.1, -0.2, 0.3, 0.0], [1.5, 0.5, 2.0, 1.0]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def wan_vae(tmp_path_factory):
    """A tiny Wan 2.1-style VAE (4 latent channels, 8x spatial, 4x temporal) in a pipeline folder's vae/."""
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, attn_scales=[],
                                     temperal_downsample=[False, True, True], latents_mean=MEAN, latents_std=STD).eval()
    pipe = tmp_path_factory.mktemp("wan") / "Wan-tiny-Diffusers"
    vae.save_pretrained(str(pipe / "vae"))
    return str(pipe), vae


def encoded(vae, video):
    """What WanPipeline would train on: the VAE's posterior mean of (F, 3, H, W), normalised, as (F', z, h, w)."""
    with torch.no_grad():
        z = vae.encode(video.transpose(0, 1)[None]).latent_dist.mode()[0]  # (z, F', h, w)
    mean, std = torch.tensor(MEAN).view(-1, 1, 1, 1), torch.tensor(STD).view(-1, 1, 1, 1)
    return ((z - mean) / std).transpose(0, 1), z


def test_wan_latents_are_normalised_as_wan_pipeline(wan_vae, tmp_path):
    pipe, vae = wan_vae
    ds = MovingShapes(num_frames=5, size=16, length=5, text_len=4, text_dim=6)
    info = precompute_latents(ds, pipe, str(tmp_path / "lat"), batch_size=2, shard_size=2)
    assert info == json.loads((tmp_path / "lat" / "info.json").read_text())
    assert info["vae_class"] == "AutoencoderKLWan" and info["scaling_factor"] is None
    assert info["count"] == 5 and info["shape"] == [2, 4, 2, 2]  # 1 + 4 frames -> 2 latent frames, 16 px -> 2
    assert info["latents_mean"] == pytest.approx(MEAN) and info["latents_std"] == pytest.approx(STD)
    assert info["shards"] == [f"latents-{k:05d}.safetensors" for k in range(3)]
    lat = LatentFolder(str(tmp_path / "lat"))
    assert len(lat) == 5 and lat.latents_mean == info["latents_mean"] and lat.scaling_factor is None
    for i in (0, 3, 4):  # first, middle and last shard
        expected, z = encoded(vae, ds[i]["x"])
        item = lat[i]
        assert item["x"].shape == (2, 4, 2, 2) and item["x"].dtype == torch.float32
        torch.testing.assert_close(item["x"], expected, rtol=1e-5, atol=1e-6)
        # WanPipeline's decode: latents_std = 1 / std; latents = latents / latents_std + latents_mean -> the VAE's z
        latents = item["x"].transpose(0, 1)[None]
        latents_mean = torch.tensor(vae.config.latents_mean).view(1, 4, 1, 1, 1)
        latents_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, 4, 1, 1, 1)
        torch.testing.assert_close((latents / latents_std + latents_mean)[0], z, rtol=1e-5, atol=1e-6)
        assert torch.equal(item["prompt_embeds"], ds[i]["prompt_embeds"]) and int(item["label"]) == i % 4
    # the normalisation is per channel: it changes each channel differently
    raw = encoded(vae, ds[0]["x"])[1]
    assert not torch.allclose(lat[0]["x"].transpose(0, 1), raw)


def test_wan_frames_images_and_non_square_clips(wan_vae, tmp_path, capsys):
    from training.precompute_latents import main

    pipe, vae = wan_vae
    # 4 frames are not 1 + 4k: one error line, no traceback
    args = ["--vae", pipe, "--out", str(tmp_path / "bad"), "--data", "type=moving_shapes", "--data", "num_frames=4",
            "--data", "size=16", "--data", "length=2"]
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "encodes 1 + 4 k frames (e.g. 81), the data gives 4" in err
    assert not os.path.exists(tmp_path / "bad" / "info.json")
    # images: one-frame videos
    info = precompute_latents(MovingShapes(num_frames=1, size=16, length=2), pipe, str(tmp_path / "img"))
    assert info["shape"] == [1, 4, 2, 2]
    # non-square clips from a video folder ([height, width], scaled to cover, centre-cropped)
    for name in ("a", "b"):
        write_video(tmp_path / "videos" / f"{name}.mp4", num=8)
    videos = VideoFolder(str(tmp_path / "videos"), num_frames=5, size=[16, 32])
    assert videos[0]["x"].shape == (5, 3, 16, 32)
    info = precompute_latents(videos, pipe, str(tmp_path / "wide"))
    assert info["shape"] == [2, 4, 2, 4]
    expected, _ = encoded(vae, videos[1]["x"])
    torch.testing.assert_close(LatentFolder(str(tmp_path / "wide"))[1]["x"], expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"size must be an int or \[height, width\]"):
        VideoFolder(str(tmp_path / "videos"), size=[16, 32, 3])


def test_captions_to_latents_to_the_wan_recipe(wan_vae, tmp_path, capsys):
    """videos + captions -> encode-text sidecars (umT5) -> Wan VAE latents -> 2 steps of convert-wan2.1-t2v-1.3B-stage1."""
    from skipdit_core.cli import main as cli_main
    from test_text_encoding_wan import D, save_umt5
    from training.precompute_latents import main as precompute

    import shutil

    from test_text_encoding import save_tokenizer

    pipe = str(tmp_path / "Wan-tiny-Diffusers")  # a pipeline folder with its text encoder, tokenizer and VAE
    shutil.copytree(wan_vae[0], pipe)
    save_umt5(os.path.join(pipe, "text_encoder"), tokenizer=False)
    save_tokenizer(os.path.join(pipe, "tokenizer"), bert=False)
    videos = tmp_path / "videos"
    for name, caption in (("a", "a cat walks on the beach"), ("b", "a red ball in snow")):
        write_video(videos / f"{name}.mp4", num=9)
        (videos / f"{name}.txt").write_text(caption)
    assert cli_main(["encode-text", "--device", "cpu", "--family", "wan", "--text-encoder", pipe,
                     "--caption-dir", str(videos)]) == 0
    out = tmp_path / "wan-latents"
    assert precompute(["--vae", pipe, "--out", str(out), "--batch-size", "2", "--data", "type=video_folder",
                       "--data", f"root={videos}", "--data", "require_text=true", "--data", "num_frames=9",
                       "--data", "size=[16, 32]"]) == 0
    assert "wrote 2 latents (3, 4, 2, 4) (AutoencoderKLWan)" in capsys.readouterr().out
    data = build_dataset({"type": "latents", "root": str(out)})
    assert data[0]["prompt_embeds"].shape == (512, D) and int(data[0]["prompt_attention_mask"].sum()) == 7

    tiny = dict(dim=32, ffn_dim=64, num_layers=2, num_heads=2, in_channels=4, out_channels=4, text_dim=D, freq_dim=32)
    config = models.make_config("wan", tiny)
    vanilla = tmp_path / "wan2.1_t2v_tiny_fp16.safetensors"
    save_safetensors(randomize(models.build_model("wan", config), seed=1).state_dict(), str(vanilla), "wan", config,
                     torch.float16)
    with open(os.path.join(ROOT, "training", "configs", "convert-wan2.1-t2v-1.3B-stage1.yaml")) as f:
        raw = yaml.safe_load(f)
    assert raw["data"]["type"] == "latents" and raw["model"]["skip_init"] == "pass_through"
    raw["model"].update(config={**raw["model"]["config"], **tiny, "num_skips": 1}, init_from=str(vanilla))
    raw["data"]["root"] = str(out)
    raw["train"].update(output_dir=str(tmp_path / "run"), max_steps=2, batch_size=2, grad_accum_steps=1, log_every=1,
                        save_every=2, mixed_precision="no", num_workers=2)  # workers: the shards opened per worker
    result = train(from_dict(raw))
    assert result["step"] == 2 and torch.isfinite(torch.tensor(result["loss"]))
    logged = capsys.readouterr().out
    assert "skip branches started as an exact pass-through" in logged and "activation checkpointing of 2 blocks" in logged
    model, ckpt = load_model(os.path.join(result["checkpoint"], "ema.safetensors"))
    assert ckpt.family == "wan" and model.config.num_skips == 1 and model.config.in_channels == 4
    from safetensors.torch import load_file

    start, trained = load_file(str(vanilla)), load_file(os.path.join(result["checkpoint"], "model.safetensors"))
    assert {v.dtype for v in trained.values()} == {torch.bfloat16}  # the recipe's save_dtype
    assert all(torch.equal(trained[k], start[k].to(torch.bfloat16)) for k in start)  # stage 1 keeps the released weights
