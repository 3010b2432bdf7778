"""Loading files as people download them, detection, conversion, and clear errors on bad input."""
from __future__ import annotations

import argparse
import json
import os
import pickle

import pytest
import torch
from helpers import randomize
from safetensors.torch import save_file

from skipdit_core import CheckpointError, convert_to_safetensors, inspect_checkpoint, load_model
from skipdit_core.cli import main as cli_main
from skipdit_core.models.dit import DiT, DiTConfig
from skipdit_core.models.latte import Latte, LatteConfig

TINY_DIT = DiTConfig(input_size=8, hidden_size=128, depth=4, num_heads=2, num_classes=10, skip=True)
TINY_LATTE = LatteConfig(input_size=8, hidden_size=128, depth=8, num_heads=2, num_frames=4, num_classes=5, skip=True)


@pytest.fixture
def dit():
    return randomize(DiT(TINY_DIT), seed=11).eval()


def _same_output(a, b, *inputs):
    with torch.no_grad():
        return torch.equal(a(*inputs), b(*inputs))


DIT_INPUTS = (torch.randn(2, 4, 8, 8), torch.tensor([1, 800]), torch.tensor([3, 10]))


def test_training_checkpoint_prefers_ema(tmp_path, dit):
    """DiT-XL-2-skip.pt layout: {"model", "ema", "opt", "args"}; loaders pick ema."""
    other = randomize(DiT(TINY_DIT), seed=12)
    path = tmp_path / "DiT-XL-2-skip.pt"
    torch.save(
        {"model": other.state_dict(), "ema": dit.state_dict(), "opt": {"state": {}, "param_groups": []},
         "args": argparse.Namespace(model="DiT-XL/2", lr=1e-4)},
        path,
    )
    model, ckpt = load_model(path)
    assert (ckpt.family, ckpt.container) == ("dit", "ema")
    assert ckpt.config == TINY_DIT
    assert _same_output(model, dit, *DIT_INPUTS)


def test_bare_state_dict_and_module_prefix(tmp_path, dit):
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in dit.state_dict().items()}}, path)
    model, ckpt = load_model(path)
    assert ckpt.container == "state_dict"
    assert _same_output(model, dit, *DIT_INPUTS)


def test_latte_detected_with_frames_and_classes(tmp_path):
    latte = randomize(Latte(TINY_LATTE), seed=13).eval()
    path = tmp_path / "ucf101-skip.pt"
    torch.save({"ema": latte.state_dict()}, path)
    ckpt = inspect_checkpoint(path)
    assert ckpt.family == "latte" and ckpt.config == TINY_LATTE
    model, _ = load_model(path)
    x, t, y = torch.randn(1, 4, 4, 8, 8), torch.tensor([5]), torch.tensor([1])
    assert _same_output(model, latte, x, t, y)


def test_override_and_dtype(tmp_path, dit):
    path = tmp_path / "m.pt"
    torch.save(dit.state_dict(), path)
    model, ckpt = load_model(path, overrides={"num_heads": 2}, dtype=torch.bfloat16)
    assert ckpt.config.num_heads == 2 and model.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="no field 'heads'"):
        inspect_checkpoint(path, overrides={"heads": 2})


def test_convert_records_config(tmp_path, dit):
    src, dst = tmp_path / "m.pt", tmp_path / "m.safetensors"
    torch.save({"model": dit.state_dict(), "ema": dit.state_dict()}, src)
    convert_to_safetensors(src, dst)
    from safetensors import safe_open

    with safe_open(str(dst), "pt") as f:
        meta = f.metadata()
    assert meta["skipdit.family"] == "dit" and json.loads(meta["skipdit.config"])["depth"] == 4
    model, ckpt = load_model(dst)
    assert ckpt.config == TINY_DIT and _same_output(model, dit, *DIT_INPUTS)
    # the recorded config wins over detection (e.g. a head count detection cannot see)
    convert_to_safetensors(src, dst, overrides={"num_heads": 2})
    assert inspect_checkpoint(dst).config.num_heads == 2


def test_cli_info_and_convert(tmp_path, dit, capsys):
    src = tmp_path / "m.pt"
    torch.save(dit.state_dict(), src)
    assert cli_main(["info", str(src), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["family"], info["variant"], info["long_skips"]) == ("dit", "skip", 2)
    assert cli_main(["convert", str(src), str(tmp_path / "m.safetensors"), "--dtype", "bf16"]) == 0
    assert inspect_checkpoint(tmp_path / "m.safetensors").state_dict["pos_embed"].dtype == torch.bfloat16
    assert cli_main(["info", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt: no such file" in capsys.readouterr().err


# ----------------------------------------------------------------------------- bad input


def _error(path, **kw) -> str:
    with pytest.raises(CheckpointError) as e:
        load_model(path, **kw)
    msg = str(e.value)
    assert str(path) in msg
    return msg


def test_not_a_checkpoint(tmp_path):
    p = tmp_path / "notes.pt"
    p.write_text("these are my notes, not weights\n" * 4)
    assert "not a checkpoint" in _error(p)
    p = tmp_path / "model.safetensors"
    p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + b"\0" * 32)
    assert "not a valid safetensors file" in _error(p)


def test_truncated_files(tmp_path, dit):
    pt, st = tmp_path / "m.pt", tmp_path / "m.safetensors"
    torch.save(dit.state_dict(), pt)
    save_file(dit.state_dict(), str(st))
    for path in (pt, st):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        assert "truncated" in _error(path)


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_code_executing_pickle_is_refused(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": Exploit()}, p)
    msg = _error(p)
    assert "refused" in msg and "code execution" in msg and "system" in msg
    legacy = tmp_path / "evil_legacy.ckpt"  # a plain (non-zip) pickle
    legacy.write_bytes(pickle.dumps({"state_dict": Exploit()}, protocol=2))
    assert "refused" in _error(legacy)


def test_other_architecture_names_missing_and_unexpected(tmp_path):
    p = tmp_path / "unet.safetensors"
    save_file({f"down_blocks.{i}.conv.weight": torch.zeros(2, 2) for i in range(9)}, str(p))
    assert "not a Skip-DiT-capable model" in _error(p)
    # a DiT file loaded as Latte: keys differ
    dit_path = tmp_path / "dit.pt"
    torch.save(DiT(TINY_DIT).state_dict(), dit_path)
    with pytest.raises(CheckpointError, match="temp_embed") as e:
        load_model(dit_path, family="latte")
    assert "missing" in str(e.value)
    # vanilla config over skip weights: 8 unexpected skip keys, listed at most 5
    msg = _error(dit_path, overrides={"skip": False})
    assert "8 unexpected" in msg and "skip_norms.0.bias" in msg and ", ..." in msg


def test_shape_mismatch_names_key_and_shapes(tmp_path, dit):
    p = tmp_path / "m.pt"
    torch.save(dit.state_dict(), p)
    msg = _error(p, overrides={"mlp_ratio": 2.0})
    assert "shape mismatch at blocks.0.mlp.fc1.weight" in msg and "(256, 128)" in msg and "(512, 128)" in msg


def test_empty_and_non_dict(tmp_path):
    p = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], p)
    assert "no model weights found" in _error(p)
    p = tmp_path / "opt_only.pt"
    torch.save({"opt": {"lr": torch.tensor(1.0)}, "step": 3}, p)
    assert "no model weights found" in _error(p)


def test_latte_t2v_file_is_not_taken_for_diffusers_hunyuan(tmp_path):
    """Latte T2V shares diffusers key names (`pos_embed.proj`) with HunyuanDiT2DModel."""
    from skipdit_core.models import build_model, make_config

    model = build_model("latte_t2v", make_config("latte_t2v", {"skip": True}, preset="Latte-T2V-tiny"))
    path = tmp_path / "Latte-skip.pt"
    torch.save({"ema": model.state_dict(), "model": model.state_dict()}, path)
    ckpt = inspect_checkpoint(path, overrides={"head_dim": 16, "num_heads": 4, "sample_size": 8})
    assert (ckpt.family, ckpt.layout, ckpt.config.num_skips) == ("latte_t2v", "original", 2)
    loaded, _ = load_model(path, overrides={"head_dim": 16, "num_heads": 4, "sample_size": 8})
    assert set(loaded.state_dict()) == set(model.state_dict())


def test_diffusers_hunyuan_file_loads_mapped(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from skipdit_core.models.hunyuan import HUNYUAN_PRESETS

    p = HUNYUAN_PRESETS["HunyuanDiT-tiny"]
    ref = diffusers.HunyuanDiT2DModel(
        num_attention_heads=p["num_heads"], attention_head_dim=p["hidden_size"] // p["num_heads"], in_channels=4,
        patch_size=2, activation_fn="gelu-approximate", sample_size=16, hidden_size=p["hidden_size"],
        num_layers=p["depth"], mlp_ratio=4.0, learn_sigma=True, cross_attention_dim=p["text_states_dim"],
        cross_attention_dim_t5=p["text_states_dim_t5"], pooled_projection_dim=p["pooled_dim"],
        text_len=p["text_len"], text_len_t5=p["text_len_t5"], use_style_cond_and_image_meta_size=False,
    )
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file(ref.state_dict(), str(path))
    model, ckpt = load_model(path)
    assert (ckpt.family, ckpt.layout) == ("hunyuan", "diffusers")
    assert model.config.depth == p["depth"] and not model.config.use_style_cond_and_image_meta_size


def test_training_run_paths_resolve_to_the_latest_ema_and_files_get_the_umask(tmp_path, dit, capsys):
    """What people type after a `training/` run: the run folder, its checkpoints/latest (a text file
    naming the step folder), a path through it, a step folder; and files readable by others (umask)."""
    from skipdit_core.loading import save_safetensors

    old = os.umask(0o022)
    try:
        root = tmp_path / "runs" / "x" / "checkpoints"
        for step in ("step-00000500", "step-00001000"):
            save_safetensors(dit.state_dict(), root / step / "ema.safetensors", "dit", TINY_DIT)
        (root / "latest").write_text("step-00001000")
    finally:
        os.umask(old)
    expected = str(root / "step-00001000" / "ema.safetensors")
    assert oct(os.stat(expected).st_mode & 0o777) == "0o644"
    for typed in (tmp_path / "runs" / "x", root, root / "latest", root / "latest" / "ema.safetensors",
                  root / "step-00001000"):
        assert inspect_checkpoint(typed).path == expected, typed
    model, _ = load_model(root / "latest" / "ema.safetensors")
    assert _same_output(model, dit, *DIT_INPUTS)
    assert cli_main(["info", str(root / "latest" / "ema.safetensors")]) == 0
    assert expected in capsys.readouterr().out
    with pytest.raises(CheckpointError, match="no such file"):
        inspect_checkpoint(root / "latest" / "model-missing.safetensors")
