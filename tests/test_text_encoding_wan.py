"""`skipdit encode-text --family wan` on a tiny random umT5 (transformers' UMT5EncoderModel) saved offline in the
layout of Wan-AI/Wan2.1-T2V-1.3B-Diffusers (text_encoder/ + tokenizer/): 512 tokens, the states of the padding zeroed
exactly as diffusers' WanPipeline._get_t5_prompt_embeds gives them, the caption cleaned as its prompt_clean, the files
read by `skipdit sample` and, as sidecars, by training's video_folder; and one error line per bad folder."""
from __future__ import annotations

import os
import re
import types

import pytest
import torch
from helpers import randomize
from safetensors.torch import load_file

pytest.importorskip("transformers")

from skipdit_core import text_encoding as te  # noqa: E402
from skipdit_core.cli import main as cli_main  # noqa: E402
from skipdit_core.loading import save_safetensors  # noqa: E402
from skipdit_core.models import build_model, make_config  # noqa: E402
from test_text_encoding import T5_SPECIALS, WORDS, save_t5, save_tokenizer  # noqa: E402

D = 32  # the tiny umT5's width = the tiny Wan's text_dim


def save_umt5(folder, tokenizer: bool = True) -> None:
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = UMT5Config(vocab_size=len(T5_SPECIALS) + len(WORDS), d_model=D, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                     feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(3)
    randomize(UMT5EncoderModel(cfg), seed=3, std=0.3).eval().save_pretrained(str(folder))
    if tokenizer:
        save_tokenizer(folder, bert=False)


@pytest.fixture(scope="module")
def wan_pipeline(tmp_path_factory):
    """A diffusers Wan pipeline folder's text half: text_encoder/ (umT5) + tokenizer/."""
    root = tmp_path_factory.mktemp("wan") / "Wan2.1-T2V-tiny-Diffusers"
    save_umt5(root / "text_encoder", tokenizer=False)
    save_tokenizer(root / "tokenizer", bert=False)
    return str(root)


def pipeline_embeds(folder: str, prompts: list[str], max_length: int) -> torch.Tensor:
    """diffusers' own WanPipeline._get_t5_prompt_embeds, run on the same encoder and tokenizer."""
    from diffusers import WanPipeline
    from transformers import AutoTokenizer, UMT5EncoderModel

    stand_in = types.SimpleNamespace(
        tokenizer=AutoTokenizer.from_pretrained(os.path.join(folder, "tokenizer"), local_files_only=True),
        text_encoder=UMT5EncoderModel.from_pretrained(os.path.join(folder, "text_encoder"), local_files_only=True).eval(),
        _execution_device=torch.device("cpu"))
    with torch.no_grad():
        return WanPipeline._get_t5_prompt_embeds(stand_in, prompts, max_sequence_length=max_length,
                                                 device=torch.device("cpu"), dtype=torch.float32)


def test_wan_file_is_what_wan_pipeline_gives(wan_pipeline, tmp_path, capsys):
    out = tmp_path / "cat.safetensors"
    prompt = "a  cat walks &amp;amp; runs\n on the beach"  # cleaned to "a cat walks & runs on the beach"
    assert cli_main(["encode-text", "--device", "cpu", "--family", "wan", "--text-encoder", wan_pipeline, "--prompt", prompt,
                     "-o", str(out)]) == 0
    assert "prompt_embeds (1, 512, 32)" in capsys.readouterr().out
    t = load_file(str(out))
    assert sorted(t) == ["negative_prompt_attention_mask", "negative_prompt_embeds", "prompt_attention_mask", "prompt_embeds"]
    assert t["prompt_embeds"].shape == t["negative_prompt_embeds"].shape == (1, 512, D)
    assert t["prompt_embeds"].dtype == torch.float32 and t["prompt_attention_mask"].dtype == torch.int64
    # "&" is not in the tiny vocabulary: <unk>; 8 tokens + </s>
    assert t["prompt_attention_mask"].tolist() == [[1] * 9 + [0] * 503]
    assert t["negative_prompt_attention_mask"].tolist() == [[1] + [0] * 511]  # "" -> </s>, its own mask
    expected = pipeline_embeds(wan_pipeline, [prompt], 512)
    assert torch.equal(t["prompt_embeds"], expected)  # bit for bit, zeros included
    assert torch.equal(t["negative_prompt_embeds"], pipeline_embeds(wan_pipeline, [""], 512))
    assert (t["prompt_embeds"][0, 9:] == 0).all() and (t["prompt_embeds"][0, :9].abs().sum(-1) > 0).all()
    # the encoder's own states of the padding are not zero: the zeroing is what makes the match
    enc = te.load_text_encoders("wan", [wan_pipeline])[0]
    tokens = enc.tokenizer([te.prepare_caption("wan", prompt)], padding="max_length", max_length=512, return_tensors="pt")
    with torch.no_grad():
        raw = enc.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)[0]
    assert raw[0, 9:].abs().sum(-1).min() > 0 and torch.equal(raw[0, :9], t["prompt_embeds"][0, :9])
    assert te.prepare_caption("wan", prompt) == "a cat walks & runs on the beach"

    # the file samples a tiny Wan of this text width (`skipdit sample --text-embeddings`)
    config = make_config("wan", {"text_dim": D, "text_len": 512}, preset="tiny")
    ckpt = tmp_path / "wan.safetensors"
    save_safetensors(randomize(build_model("wan", config), seed=2).state_dict(), str(ckpt), "wan", config)
    assert cli_main(["sample", str(ckpt), "--text-embeddings", str(out), "--steps", "2", "--frames", "1", "--size", "4",
                     "--guidance", "3", "--device", "cpu", "-o", str(tmp_path / "v.mp4")]) == 0
    latents = load_file(str(tmp_path / "v.latents.safetensors"))["latents"]
    assert latents.shape == (1, 4, 1, 4, 4) and torch.isfinite(latents).all()


def test_wan_folder_with_both_and_a_batch(wan_pipeline, tmp_path):
    both = tmp_path / "umt5"  # a transformers folder holding the encoder and its tokenizer
    save_umt5(both)
    captions = ["a red ball", "a dog runs in snow at sunset", "the cat"]
    enc = te.load_text_encoders("wan", [str(both)])
    t = te.encode_captions(captions, "wan", enc, max_lengths=[16], negative_prompt=None)
    assert sorted(t) == ["prompt_attention_mask", "prompt_embeds"] and t["prompt_embeds"].shape == (3, 16, D)
    assert torch.equal(t["prompt_embeds"], pipeline_embeds(wan_pipeline, captions, 16))  # same seed: same weights
    assert t["prompt_attention_mask"].sum(1).tolist() == [4, 8, 3]


def test_wan_caption_dir_sidecars_train(wan_pipeline, tmp_path):
    from test_training_data import write_video
    from torch.utils.data import DataLoader
    from training.data import VideoFolder
    from training.train import model_inputs

    root = tmp_path / "videos"
    write_video(root / "a.mp4", num=4)
    (root / "a.txt").write_text("a cat walks on the beach\n")
    assert cli_main(["encode-text", "--device", "cpu", "--family", "wan", "--text-encoder", wan_pipeline,
                     "--caption-dir", str(root), "--max-length", "12"]) == 0
    side = load_file(str(root / "a.safetensors"))
    assert sorted(side) == ["prompt_attention_mask", "prompt_embeds"] and side["prompt_embeds"].shape == (1, 12, D)
    ds = VideoFolder(str(root), num_frames=1, size=8, require_text=True)
    x, cond, _ = model_inputs("wan", next(iter(DataLoader(ds, batch_size=1))), 0)
    assert x.shape == (1, 3, 1, 8, 8) and torch.equal(cond["encoder_hidden_states"], side["prompt_embeds"])


def test_wan_folder_errors_are_one_line(wan_pipeline, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    no_weights = tmp_path / "no_weights"
    save_umt5(no_weights / "text_encoder", tokenizer=False)
    save_tokenizer(no_weights / "tokenizer", bert=False)
    os.remove(no_weights / "text_encoder" / "model.safetensors")
    no_tok = tmp_path / "no_tok"
    save_umt5(no_tok / "text_encoder", tokenizer=False)
    save_t5(tmp_path / "t5", D)
    out = str(tmp_path / "o.safetensors")
    cases = [
        (tmp_path / "empty", r"--text-encoder '.*empty' has no config\.json: expected a transformers umT5-XXL encoder folder"),
        (no_weights, r"'.*no_weights/text_encoder' has a config\.json but no weights"),
        (no_tok, r"no tokenizer for '.*no_tok/text_encoder': expected one of tokenizer\.json"),
        (tmp_path / "t5", r"config\.json is a 't5' model, expected the umT5-XXL encoder \(a umT5 model\)"),
    ]
    capsys.readouterr()
    for folder, message in cases:
        assert cli_main(["encode-text", "--device", "cpu", "--family", "wan", "--text-encoder", str(folder),
                         "--prompt", "a cat", "-o", out]) == 2
        err = capsys.readouterr().err
        assert err.startswith("skipdit: error: ") and err.count("\n") == 1, err
        assert re.search(message, err), (message, err)
    assert not os.path.exists(out)
