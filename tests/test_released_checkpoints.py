"""Released checkpoints as the authors' code wrote them: Latte T2V's optional null-caption buffer and
the head split the weights do not store (overrides win over the width-derived default)."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import randomize

from skipdit_core import CheckpointError, convert_to_safetensors, inspect_checkpoint, load_model
from skipdit_core.cli import main as cli_main
from skipdit_core.models import build_model, make_config
from skipdit_core.models.dit import DiT, DiTConfig
from skipdit_core.models.hunyuan import HUNYUAN_PRESETS, HunyuanDiT, HunyuanDiTConfig
from skipdit_core.models.latte import Latte, LatteConfig
from skipdit_core.models.latte_t2v import LatteT2V, LatteT2VConfig

Y_KEY = "caption_projection.y_embedding"


def t2v(skip: bool, num_heads: int = 4, head_dim: int = 16) -> LatteT2V:
    config = LatteT2VConfig(num_layers=4, num_heads=num_heads, head_dim=head_dim, sample_size=8,
                            caption_channels=32, skip=skip)
    torch.manual_seed(0)
    return randomize(LatteT2V(config), seed=3).eval()


def t2v_inputs(model, mask: bool):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 3, 8, 8, generator=g)
    text = torch.randn(2, 6, model.config.caption_channels, generator=g)
    keep = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]) if mask else None
    return x, torch.tensor([999, 400]), text, keep


def authors_file(tmp_path, model, with_y: bool, name: str):
    """A `Latte-skip.pt`-style file: the bare state dict of diffusers 0.24's model (with y_embedding)."""
    sd = dict(model.state_dict())
    if with_y:
        sd[Y_KEY] = torch.randn(120, model.config.caption_channels)
    path = tmp_path / name
    torch.save(sd, path)
    return path


@pytest.mark.parametrize("skip", [False, True], ids=["latte-t2v", "skip-latte-t2v"])
def test_latte_t2v_with_and_without_the_null_caption_loads_strictly_with_the_same_outputs(tmp_path, skip):
    ref = t2v(skip)
    outs = []
    for with_y in (True, False):
        path = authors_file(tmp_path, ref, with_y, f"{'with' if with_y else 'without'}.pt")
        model, ckpt = load_model(path, overrides={"head_dim": 16, "sample_size": 8})
        assert ckpt.family == "latte_t2v" and ckpt.config == ref.config
        assert list(ckpt.set_aside) == ([Y_KEY] if with_y else [])
        assert Y_KEY not in ckpt.state_dict
        with torch.no_grad():
            outs.append([model(*t2v_inputs(model, mask)) for mask in (False, True)])
    with torch.no_grad():
        expected = [ref(*t2v_inputs(ref, mask)) for mask in (False, True)]
    for got in outs:
        for a, b in zip(got, expected):
            assert torch.equal(a, b)


def test_skipdit_info_reports_the_set_aside_key_and_convert_keeps_it(tmp_path, capsys):
    path = authors_file(tmp_path, t2v(True), True, "Latte-skip.pt")
    assert cli_main(["info", str(path), "--set", "head_dim=16"]) == 0
    out = capsys.readouterr().out
    assert "set aside   caption_projection.y_embedding (120, 32): the learned null caption" in out
    assert cli_main(["info", str(path), "--json", "--set", "head_dim=16"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["set_aside"][Y_KEY]["shape"] == [120, 32] and "unused at inference" in info["set_aside"][Y_KEY]["use"]
    assert info["variant"] == "skip"

    converted = tmp_path / "Latte-skip.safetensors"
    convert_to_safetensors(path, converted, overrides={"head_dim": 16})
    again = inspect_checkpoint(converted)
    assert list(again.set_aside) == [Y_KEY] and again.config.head_dim == 16
    assert torch.equal(again.set_aside[Y_KEY], torch.load(path)[Y_KEY])


def test_only_the_named_optional_key_is_set_aside(tmp_path):
    model = t2v(False)
    sd = dict(model.state_dict(), **{Y_KEY: torch.randn(120, 32), "caption_projection.other": torch.randn(3)})
    torch.save(sd, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match=r"1 unexpected \[caption_projection.other\]"):
        load_model(tmp_path / "extra.pt", overrides={"head_dim": 16})
    sd = dict(model.state_dict(), **{Y_KEY: torch.randn(120, 31)})
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"shape mismatch at caption_projection.y_embedding: expected \(any, 32\), the file has \(120, 31\)"):
        load_model(tmp_path / "bad.pt", overrides={"head_dim": 16})
    # other families have no optional keys
    dit = DiT(DiTConfig(input_size=8, hidden_size=64, depth=2, num_heads=2, num_classes=4))
    torch.save(dict(dit.state_dict(), **{Y_KEY: torch.randn(120, 32)}), tmp_path / "dit.pt")
    with pytest.raises(CheckpointError, match="1 unexpected"):
        load_model(tmp_path / "dit.pt")


# --------------------------------------------------------------------------- head split


def test_latte_t2v_width_of_neither_72_nor_64_loads_with_an_override(tmp_path):
    ref = t2v(True, num_heads=5, head_dim=16)  # width 80
    path = tmp_path / "odd.pt"
    torch.save(ref.state_dict(), path)
    with pytest.raises(CheckpointError, match=r"width 80 \(pos_embed.proj.weight\) is a multiple of neither 72 nor 64"):
        load_model(path)
    for overrides in ({"head_dim": 16}, {"num_heads": 5}, {"num_heads": 5, "head_dim": 16}):
        model, ckpt = load_model(path, overrides={**overrides, "sample_size": 8})
        assert (ckpt.config.num_heads, ckpt.config.head_dim) == (5, 16), overrides
        with torch.no_grad():
            assert torch.equal(model(*t2v_inputs(model, True)), ref(*t2v_inputs(ref, True)))
    for overrides, message in (
        ({"num_heads": 3}, r"num_heads=3 does not fit the width 80"),
        ({"head_dim": 24}, r"head_dim=24 does not fit the width 80"),
        ({"num_heads": 4, "head_dim": 16}, r"num_heads=4 x head_dim=16 = 64 does not fit the width 80"),
    ):
        with pytest.raises(CheckpointError, match=message):
            load_model(path, overrides=overrides)


def test_latte_t2v_override_of_one_half_keeps_the_width_also_from_metadata(tmp_path):
    ref = t2v(False, num_heads=4, head_dim=16)  # width 64: detected as 1 x 64 by default
    path = tmp_path / "t2v.safetensors"
    convert_src = tmp_path / "t2v.pt"
    torch.save(ref.state_dict(), convert_src)
    convert_to_safetensors(convert_src, path)  # records the default split 1 x 64 in the metadata
    assert inspect_checkpoint(path).config.num_heads == 1
    model, ckpt = load_model(path, overrides={"num_heads": 4, "sample_size": 8})
    assert (ckpt.config.num_heads, ckpt.config.head_dim) == (4, 16)
    with torch.no_grad():
        assert torch.equal(model(*t2v_inputs(model, False)), ref(*t2v_inputs(ref, False)))


@pytest.mark.parametrize("family", ["dit", "latte"])
def test_dit_and_latte_head_count_override_wins_and_is_checked(tmp_path, family):
    if family == "dit":
        ref = DiT(DiTConfig(input_size=8, hidden_size=80, depth=2, num_heads=5, num_classes=4))
    else:
        ref = Latte(LatteConfig(input_size=8, hidden_size=80, depth=4, num_heads=5, num_frames=2, num_classes=4))
    randomize(ref, seed=2).eval()
    path = tmp_path / f"{family}.pt"
    torch.save(ref.state_dict(), path)
    with pytest.raises(CheckpointError, match=r"width 80 \(x_embedder.proj.weight\) is not a multiple of 64"):
        load_model(path)
    model, ckpt = load_model(path, overrides={"num_heads": 5})
    assert ckpt.config == ref.config
    with pytest.raises(CheckpointError, match=r"num_heads=3 does not divide the width 80"):
        load_model(path, overrides={"num_heads": 3})


def test_hunyuan_head_count_is_fixed_by_the_weights(tmp_path):
    config = HunyuanDiTConfig(**HUNYUAN_PRESETS["HunyuanDiT-tiny"])
    path = tmp_path / "hunyuan.pt"
    torch.save(build_model("hunyuan", make_config("hunyuan", preset="HunyuanDiT-tiny")).state_dict(), path)
    _, ckpt = load_model(path, overrides={"num_heads": config.num_heads})
    assert ckpt.config.num_heads == config.num_heads
    with pytest.raises(CheckpointError, match=rf"num_heads=1 contradicts the weights: .*q_norm.weight gives head dim {config.head_dim}"):
        load_model(path, overrides={"num_heads": 1})
