"""training/data.py: the item convention, MovingShapes' geometry and determinism, VideoFolder / ImageFolder on
small files written here, the precompute_latents -> LatentFolder round trip and build_dataset's errors."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from training.data import (
    SHAPE_CLASSES, ImageFolder, LatentFolder, MovingShapes, VideoFolder, build_dataset, precompute_latents,
)


def check_item(item, shape, label=None):
    x = item["x"]
    assert x.dtype == torch.float32 and tuple(x.shape) == shape, (x.dtype, x.shape)
    assert x.min() >= -1 and x.max() <= 1
    assert item["label"].dtype == torch.int64 and item["label"].ndim == 0
    if label is not None:
        assert item["label"].item() == label


def coverage(x):
    """Covered fraction of each pixel: background is black (-1), the shape's brightest channel is 1."""
    return (x + 1).amax(dim=-3) / 2


def centroid(cov):
    """(..., H, W) -> (..., 2) (x, y) in pixel units (the frame spans [0, W))."""
    h, w = cov.shape[-2:]
    ys, xs = torch.arange(h) + 0.5, torch.arange(w) + 0.5
    total = cov.sum((-2, -1))
    return torch.stack([(cov.sum(-2) * xs).sum(-1) / total, (cov.sum(-1) * ys).sum(-1) / total], -1)


# ---------------------------------------------------------------------------- MovingShapes

# Filled fraction of the shape's bounding box (2*half)^2, and the centroid's offset below the box centre.
EXPECTED_FILL = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5, "cross": 1 - 4 * 0.3**2}
EXPECTED_DY = {"circle": 0.0, "square": 0.0, "triangle": 1 / 3, "cross": 0.0}  # in units of half


def test_moving_shapes_items():
    ds = MovingShapes(num_frames=8, size=32, length=20)
    assert len(ds) == 20 and ds.classes == list(SHAPE_CLASSES)
    for i in range(8):
        item = ds[i]
        check_item(item, (8, 3, 32, 32), label=i % 4)
        assert set(item) == {"x", "label"}
        assert item["x"].min() == -1 and item["x"].max() > 0.9  # black background, a bright shape
    check_item(MovingShapes(num_frames=1, size=16)[3], (3, 16, 16), label=3)
    with pytest.raises(IndexError):
        ds[20]


def test_moving_shapes_determinism_and_balance():
    a, b = MovingShapes(length=40, seed=1), MovingShapes(length=40, seed=1)
    assert torch.equal(a[5]["x"], b[5]["x"]) and torch.equal(a[5]["x"], a[5]["x"])
    assert not torch.equal(a[5]["x"], a[9]["x"])  # same class, different draw
    assert not torch.equal(a[5]["x"], MovingShapes(length=40, seed=2)[5]["x"])
    assert torch.bincount(torch.tensor([a.params(i)["label"] for i in range(40)])).tolist() == [10, 10, 10, 10]
    assert next(iter(DataLoader(a, batch_size=6)))["label"].tolist() == [0, 1, 2, 3, 0, 1]
    assert [MovingShapes(num_classes=2)[i]["label"].item() for i in range(4)] == [0, 1, 0, 1]


def test_moving_shapes_move_and_stay_inside():
    ds = MovingShapes(num_frames=8, size=32, length=16)
    for i in range(16):
        c = centroid(coverage(ds[i]["x"]))  # (F, 2)
        assert (c[-1] - c[0]).norm() > 0.5, f"item {i} did not move: {c[0]} -> {c[-1]}"
        steps = (c[1:] - c[:-1]).norm(dim=-1)
        assert steps.max() < 0.1 * 32, "jumps instead of moving at constant speed"
    # Inside the frame, bounces included (32 frames): no frame loses part of the shape to the edges. The
    # area is the shape's exact area up to the 4x4 supersampling's quantisation (a few % at 32x32).
    ds = MovingShapes(num_frames=32, size=32, length=8)
    for i in range(8):
        p, cov = ds.params(i), coverage(ds[i]["x"])
        area = cov.sum((-2, -1)) / (2 * p["half"]) ** 2
        assert torch.allclose(area, torch.tensor(EXPECTED_FILL[p["shape"]]), rtol=0.08), (p["shape"], area)
        assert (p["centers"] >= p["half"] - 1e-4).all() and (p["centers"] <= 32 - p["half"] + 1e-4).all()
        assert 0.25 * 16 - 1e-4 <= p["half"] <= 0.40 * 16 + 1e-4


def test_moving_shapes_bounces():
    """A long clip must hit a wall: some velocity component changes sign, with the shape still inside."""
    c = MovingShapes(num_frames=64, size=32, length=4).params(0)["centers"]
    v = c[1:] - c[:-1]
    assert ((v[1:] * v[:-1]) < 0).any()


def test_moving_shapes_geometry():
    """Each class draws its own shape: area and centroid from the frames match the shape's geometry."""
    ds = MovingShapes(num_frames=2, size=64, length=8)
    for i in range(8):
        p, cov = ds.params(i), coverage(ds[i]["x"])
        fill = cov.sum((-2, -1)) / (2 * p["half"]) ** 2
        assert torch.allclose(fill, torch.tensor(EXPECTED_FILL[p["shape"]]), atol=0.02), (p["shape"], fill)
        offset = (centroid(cov) - p["centers"]) / p["half"]
        expected = torch.tensor([0.0, EXPECTED_DY[p["shape"]]])
        assert torch.allclose(offset, expected.expand_as(offset), atol=0.02), (p["shape"], offset)
        # The colour: every pixel is a multiple of it (one colour, anti-aliased edges).
        full = cov > 0.999
        assert torch.allclose(((ds[i]["x"] + 1) / 2).permute(0, 2, 3, 1)[full], p["colour"].expand(int(full.sum()), 3),
                              atol=1e-5)


def test_moving_shapes_class_colours():
    """colours="by_class": each class in its own fixed colour; size, path and label draws unchanged."""
    rand, by_class = MovingShapes(length=8), MovingShapes(length=8, colours="by_class")
    colours = {}
    for i in range(8):
        a, b = rand.params(i), by_class.params(i)
        assert a["label"] == b["label"] and a["half"] == b["half"] and torch.equal(a["centers"], b["centers"])
        colours.setdefault(b["label"], b["colour"])
        assert torch.equal(colours[b["label"]], b["colour"])
        full = coverage(by_class[i]["x"]) > 0.999
        pixels = ((by_class[i]["x"] + 1) / 2).permute(0, 2, 3, 1)[full]
        assert torch.allclose(pixels, b["colour"].expand_as(pixels), atol=1e-5)
    assert len(colours) == 4
    rgb = torch.stack([colours[c] for c in range(4)])
    assert rgb.argmax(1).tolist()[:3] == [0, 1, 2]  # red circle, green square, blue triangle
    assert (rgb[3, :2] > 0.9).all() and rgb[3, 2] < 0.5  # yellow cross
    with pytest.raises(ValueError, match="colours must be one of random, by_class"):
        MovingShapes(colours="rainbow")


def test_moving_shapes_text():
    ds = MovingShapes(length=12, text_len=6, text_dim=10)
    items = [ds[i] for i in range(8)]
    for item in items:
        assert item["prompt_embeds"].shape == (6, 10) and item["prompt_embeds"].dtype == torch.float32
        assert item["prompt_attention_mask"].dtype == torch.int64 and item["prompt_attention_mask"].tolist() == [1] * 6
    assert torch.equal(items[1]["prompt_embeds"], items[5]["prompt_embeds"])  # same class
    for a in range(4):
        for b in range(a + 1, 4):
            assert not torch.allclose(items[a]["prompt_embeds"], items[b]["prompt_embeds"])
    assert 0.7 < items[0]["prompt_embeds"].std() < 1.3  # unit scale
    assert torch.equal(MovingShapes(text_len=6, text_dim=10)[3]["prompt_embeds"], items[3]["prompt_embeds"])
    assert ds.caption(0) == "a circle moving" and ds.caption(3) == "a cross moving"
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["x"].shape == (4, 8, 3, 32, 32) and batch["prompt_embeds"].shape == (4, 6, 10)
    with pytest.raises(ValueError, match="text_len"):
        MovingShapes(text_dim=8)


# ---------------------------------------------------------------------------- VideoFolder

H, W, N = 40, 48, 20


def frame_value(k):
    return 20 + 10 * k  # frame k's background brightness: frames are told apart by it


def write_video(path, num=N, codec="libx264"):
    """num frames of H x W: a grey background of brightness frame_value(k) and a white bar moving right."""
    import av

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=8)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "0"}
        for k in range(num):
            frame = np.full((H, W, 3), frame_value(k), np.uint8)
            frame[:, 2 * k:2 * k + 4] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def frame_indices(x):
    """Which written frame each (F, 3, h, w) output frame is, read back from its background brightness."""
    values = ((x + 1) * 127.5).flatten(1).median(dim=1).values
    return [round((v - 20) / 10) for v in values.tolist()]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    write_video(root / "cats" / "a.mp4")
    write_video(root / "cats" / "sub" / "b.mkv")  # mkv stores no frame count: counted by demuxing
    write_video(root / "dogs" / "c.mp4", num=5)  # shorter than a clip
    return root


def test_video_folder_clips(videos):
    ds = VideoFolder(str(videos), num_frames=4, size=16, frame_interval=3)
    assert len(ds) == 3 and ds.classes == [] and ds.files[0].endswith("a.mp4")
    starts = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        for i in (0, 1):
            item = ds[i]
            check_item(item, (4, 3, 16, 16), label=-1)
            idx = frame_indices(item["x"])
            assert idx == [idx[0] + 3 * k for k in range(4)] and 0 <= idx[0] <= N - 10, idx
            starts.add(idx[0])
    assert len(starts) > 3  # random starts, redrawn per epoch
    ds.set_epoch(2)
    again = VideoFolder(str(videos), num_frames=4, size=16, frame_interval=3)
    again.set_epoch(2)
    assert torch.equal(ds[0]["x"], again[0]["x"])  # deterministic in (seed, i, epoch)
    # The bar moves right by 2 pixels a frame (0.8 at this scale): the content is the frames', in order.
    bar = [((x + 1) / 2).mean(0).mean(0).argmax().item() for x in ds[0]["x"]]
    assert bar == sorted(bar) and bar[-1] > bar[0]


def test_video_folder_short_video_repeats_last_frame(videos):
    ds = VideoFolder(str(videos), num_frames=6, size=16, frame_interval=2)
    assert frame_indices(ds[2]["x"]) == [0, 2, 4, 4, 4, 4]
    assert frame_indices(VideoFolder(str(videos), num_frames=6, size=16)[2]["x"]) == [0, 1, 2, 3, 4, 4]


def test_video_folder_resize_crop(videos):
    x = VideoFolder(str(videos), num_frames=1, size=20)[0]["x"]  # 40x48 -> 20x24 -> crop columns 2..22
    assert x.shape == (1, 3, 20, 20)
    full = VideoFolder(str(videos), num_frames=1, size=40)[0]["x"]  # no resize: a plain 40x40 centre crop
    idx = frame_indices(full)[0]
    # The bar (original columns 2*idx .. 2*idx+3) lands 4 columns left: the crop drops 4 of 48 each side.
    bright = ((full[0] + 1) * 127.5 > 240).all(dim=0).all(dim=0).nonzero().flatten().tolist()
    assert bright == [c - 4 for c in range(2 * idx, 2 * idx + 4) if 0 <= c - 4 < 40], (idx, bright)


def test_video_folder_classes_and_text(videos, tmp_path):
    ds = VideoFolder(str(videos), num_frames=2, size=16, class_subfolders=True)
    assert ds.classes == ["cats", "dogs"]
    assert [ds[i]["label"].item() for i in range(3)] == [0, 0, 1]
    with pytest.raises(FileNotFoundError, match="a.safetensors"):
        VideoFolder(str(videos), require_text=True)

    root = tmp_path / "t2v"
    write_video(root / "x.mp4", num=6)
    write_video(root / "y.mp4", num=6)
    embeds = torch.randn(1, 7, 5)
    save_file({"prompt_embeds": embeds, "prompt_attention_mask": torch.tensor([[1, 1, 1, 0, 0, 0, 0]])},
              str(root / "x.safetensors"))
    save_file({"prompt_embeds": embeds[0].half()}, str(root / "y.safetensors"))  # (L, D), no mask
    ds = VideoFolder(str(root), num_frames=2, size=16, require_text=True)
    x, y = ds[0], ds[1]
    assert torch.equal(x["prompt_embeds"], embeds[0]) and x["prompt_embeds"].dtype == torch.float32
    assert x["prompt_attention_mask"].tolist() == [1, 1, 1, 0, 0, 0, 0]
    assert x["prompt_attention_mask"].dtype == torch.int64
    assert y["prompt_embeds"].shape == (7, 5) and y["prompt_attention_mask"].tolist() == [1] * 7
    batch = next(iter(DataLoader(ds, batch_size=2)))
    assert batch["prompt_embeds"].shape == (2, 7, 5) and batch["label"].tolist() == [-1, -1]


def test_video_folder_errors(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no videos here")
    with pytest.raises(ValueError, match=r"empty.*\.mp4.*\.gif"):
        VideoFolder(str(tmp_path / "empty"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.mp4").write_bytes(b"this is not a video" * 10)
    ds = VideoFolder(str(bad))  # files are opened lazily, by the item that needs them
    with pytest.raises(RuntimeError, match="broken.mp4"):
        ds[0]
    write_video(tmp_path / "loose" / "v.mp4", num=2)
    with pytest.raises(ValueError, match="v.mp4"):
        VideoFolder(str(tmp_path / "loose"), class_subfolders=True)


# ---------------------------------------------------------------------------- ImageFolder

@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    (root / "a").mkdir()
    (root / "b" / "nested").mkdir(parents=True)
    # 80x40: red 12 columns | green | blue 12 columns. After the resize to 16 high, the centre crop is green.
    rgb = np.zeros((40, 80, 3), np.uint8)
    rgb[:, :12, 0], rgb[:, 12:68, 1], rgb[:, 68:, 2] = 255, 255, 255
    Image.fromarray(rgb).save(root / "a" / "stripes.png")
    # Left half red, right half blue: shows flips.
    lr = np.zeros((20, 20, 3), np.uint8)
    lr[:, :10, 0], lr[:, 10:, 2] = 255, 255
    Image.fromarray(lr).save(root / "a" / "halves.png")
    Image.fromarray(np.full((30, 50), 200, np.uint8), mode="L").save(root / "b" / "nested" / "grey.png")
    Image.fromarray(np.full((64, 64, 4), 100, np.uint8), mode="RGBA").save(root / "b" / "rgba.webp", lossless=True)
    return root


def test_image_folder(images):
    ds = ImageFolder(str(images), size=16, flip=0.0)
    assert ds.classes == ["a", "b"] and len(ds) == 4
    assert [ds[i]["label"].item() for i in range(4)] == [0, 0, 1, 1]
    for i in range(4):
        check_item(ds[i], (3, 16, 16))
    halves, stripes, grey, rgba = (ds[i]["x"] for i in range(4))  # sorted: halves.png < stripes.png
    green = torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1)
    assert torch.allclose(stripes, green.expand(3, 16, 16), atol=0.05)  # centre crop of the long side
    assert torch.allclose(grey, torch.full((3, 16, 16), 200 / 127.5 - 1), atol=1e-6)  # L -> RGB
    assert torch.allclose(rgba, torch.full((3, 16, 16), 100 / 127.5 - 1), atol=1e-6)  # box halving, then bicubic
    assert halves[0, :, :6].min() > 0.9 and halves[2, :, -6:].min() > 0.9  # red left, blue right

    flipped = ImageFolder(str(images), size=16, flip=1.0)[0]["x"]
    assert torch.equal(flipped, halves.flip(-1))

    ds = ImageFolder(str(images), size=16, seed=3)
    flips = []
    for epoch in range(12):
        ds.set_epoch(epoch)
        x = ds[0]["x"]
        assert torch.equal(x, halves) or torch.equal(x, halves.flip(-1))
        flips.append(torch.equal(x, halves.flip(-1)))
    assert 2 <= sum(flips) <= 10  # about half
    again = ImageFolder(str(images), size=16, seed=3)
    again.set_epoch(11)
    assert torch.equal(again[0]["x"], x)


def test_image_folder_errors(tmp_path):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.png").write_bytes(b"")
    with pytest.raises(ValueError, match="no class subfolders"):
        ImageFolder(str(tmp_path / "flat"))
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"cls.*\.png"):
        ImageFolder(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="missing"):
        ImageFolder(str(tmp_path / "missing"))
    (tmp_path / "bad" / "c").mkdir(parents=True)
    (tmp_path / "bad" / "c" / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(RuntimeError, match="broken.jpg"):
        ImageFolder(str(tmp_path / "bad"))[0]


# ---------------------------------------------------------------------------- latents

@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers", reason="precompute_latents needs diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=0.5,
    ).eval()
    path = tmp_path_factory.mktemp("vae") / "vae"
    vae.save_pretrained(str(path))
    return str(path), vae


def test_latents_round_trip_video(tiny_vae, tmp_path):
    path, vae = tiny_vae
    ds = MovingShapes(num_frames=3, size=16, length=5, text_len=4, text_dim=6)
    info = precompute_latents(ds, path, str(tmp_path / "lat"), batch_size=2, shard_size=2)
    assert sorted(os.listdir(tmp_path / "lat")) == ["info.json"] + [f"latents-{k:05d}.safetensors" for k in range(3)]
    assert info == json.loads((tmp_path / "lat" / "info.json").read_text())
    assert info["count"] == 5 and info["shape"] == [3, 4, 8, 8] and info["scaling_factor"] == 0.5
    lat = LatentFolder(str(tmp_path / "lat"))
    assert len(lat) == 5 and lat.classes == list(SHAPE_CLASSES) and lat.scaling_factor == 0.5
    with torch.no_grad():
        for i in (0, 3):
            expected = vae.encode(ds[i]["x"]).latent_dist.mean * 0.5  # the item's frames as one batch
            item = lat[i]
            check_item({**item, "x": item["x"].clamp(-1, 1)}, (3, 4, 8, 8), label=i % 4)
            assert torch.allclose(item["x"], expected, atol=1e-5)
            assert torch.equal(item["prompt_embeds"], ds[i]["prompt_embeds"])
            assert torch.equal(item["prompt_attention_mask"], ds[i]["prompt_attention_mask"])
    assert torch.equal(build_dataset({"type": "latents", "root": str(tmp_path / "lat")})[4]["x"], lat[4]["x"])


def test_latents_images_with_repeats(tiny_vae, images, tmp_path):
    path, vae = tiny_vae
    ds = ImageFolder(str(images), size=16, seed=1)
    info = precompute_latents(ds, path, str(tmp_path / "lat"), batch_size=3, repeats=2)
    lat = LatentFolder(str(tmp_path / "lat"))
    assert info["count"] == len(lat) == 8 and info["shape"] == [4, 8, 8] and lat.classes == ["a", "b"]
    assert [lat[i]["label"].item() for i in range(8)] == [0, 0, 1, 1] * 2
    with torch.no_grad():
        for r in range(2):  # repeat r was encoded with set_epoch(r): its own flips
            ds.set_epoch(r)
            for i in range(4):
                expected = vae.encode(ds[i]["x"][None]).latent_dist.mean[0] * 0.5
                assert torch.allclose(lat[4 * r + i]["x"], expected, atol=1e-5)


def test_latent_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="info.json"):
        LatentFolder(str(tmp_path))


# ---------------------------------------------------------------------------- build_dataset

def test_build_dataset(images):
    ds = build_dataset({"type": "moving_shapes", "num_frames": 2, "size": 16, "length": 3})
    assert isinstance(ds, MovingShapes) and ds[0]["x"].shape == (2, 3, 16, 16)
    assert isinstance(build_dataset({"type": "image_folder", "root": str(images), "size": 8}), ImageFolder)
    with pytest.raises(ValueError, match=r"'bogus'.*moving_shapes.*video_folder.*image_folder.*latents"):
        build_dataset({"type": "bogus"})
    with pytest.raises(ValueError, match="unknown dataset type None"):
        build_dataset({"num_frames": 2})
    with pytest.raises(ValueError, match=r"frames.*accepted.*num_frames.*text_dim"):
        build_dataset({"type": "moving_shapes", "frames": 2})
    with pytest.raises(ValueError, match="needs root"):
        build_dataset({"type": "video_folder", "size": 8})


def test_precompute_latents_command(tiny_vae, tmp_path):
    from training.precompute_latents import main

    path, vae = tiny_vae
    out = tmp_path / "latents"
    args = ["--vae", path, "--out", str(out), "--batch-size", "4", "--data", "type=moving_shapes",
            "--data", "num_frames=1", "--data", "size=16", "--data", "length=6", "--data", "num_classes=2"]
    assert main(args) == 0
    latents = build_dataset({"type": "latents", "root": str(out)})
    assert len(latents) == 6 and latents[0]["x"].shape == (4, 8, 8) and int(latents[1]["label"]) == 1
    with torch.no_grad():
        x = MovingShapes(num_frames=1, size=16, length=6, num_classes=2)[1]["x"][None]
        expected = vae.encode(x).latent_dist.mean[0] * 0.5
    torch.testing.assert_close(latents[1]["x"], expected, rtol=1e-4, atol=1e-5)
