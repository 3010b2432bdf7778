"""`skipdit encode-text` on tiny random text encoders built offline (a T5, a BERT, an mT5; tokenizers trained on a
few words with the `tokenizers` library): the keys, shapes, dtypes and masks of the files, equality with the
encoders run by hand, and that `skipdit sample --text-embeddings` and training's video_folder read them."""
from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import assert_close, randomize
from safetensors import safe_open
from safetensors.torch import load_file

pytest.importorskip("transformers")

from skipdit_core import text_encoding as te  # noqa: E402
from skipdit_core.cli import main as cli_main  # noqa: E402
from skipdit_core.loading import save_safetensors  # noqa: E402
from skipdit_core.models import build_model, make_config  # noqa: E402
from skipdit_core.pipeline import Request, generate  # noqa: E402

WORDS = "a cat dog walks runs on the beach in snow at sunset red ball".split()
T5_SPECIALS, BERT_SPECIALS = ["<pad>", "</s>", "<unk>"], ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]


def save_tokenizer(folder, bert: bool) -> int:
    """A word-level tokenizer of WORDS saved as tokenizer.json + tokenizer_config.json: T5's layout (`<pad>` 0,
    text then `</s>`) or BERT's (`[PAD]` 0, `[CLS]` text `[SEP]`). Returns the vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = BERT_SPECIALS if bert else T5_SPECIALS
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[1 if bert else 2]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bert:
        tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")
    else:
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(folder))
    return len(vocab)


def save_t5(folder, d_model: int, mt5: bool = False, tokenizer: bool = True) -> None:
    from transformers import MT5Config, MT5EncoderModel, T5Config, T5EncoderModel

    n = len(T5_SPECIALS) + len(WORDS)
    cfg = (MT5Config if mt5 else T5Config)(vocab_size=n, d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                           feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(1)
    (MT5EncoderModel if mt5 else T5EncoderModel)(cfg).eval().save_pretrained(str(folder))
    if tokenizer:
        save_tokenizer(folder, bert=False)


def save_bert(folder, hidden: int, tokenizer: bool = True) -> None:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=len(BERT_SPECIALS) + len(WORDS), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(2)
    BertModel(cfg).eval().save_pretrained(str(folder))
    if tokenizer:
        save_tokenizer(folder, bert=True)


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """A T5 folder for Latte T2V (d_model 32 = Latte-T2V-tiny's caption channels) and a Hunyuan-DiT diffusers
    pipeline folder (BERT 32 + mT5 48 = HunyuanDiT-tiny's text dims), tokenizers in tokenizer*/ beside them."""
    root = tmp_path_factory.mktemp("encoders")
    save_t5(root / "t5", 32)
    pipe = root / "hunyuan"
    save_bert(pipe / "text_encoder", 32, tokenizer=False)
    save_tokenizer(pipe / "tokenizer", bert=True)
    save_t5(pipe / "text_encoder_2", 48, mt5=True, tokenizer=False)
    save_tokenizer(pipe / "tokenizer_2", bert=False)
    return {"t5": str(root / "t5"), "hunyuan": str(pipe)}


def by_hand(folder, texts, max_length, tokenizer_folder=None):
    """The encoder run as the pipelines do: padded, truncated, with its mask; the last hidden state."""
    from transformers import AutoModel, AutoTokenizer, T5EncoderModel
    from transformers.models.auto.configuration_auto import AutoConfig

    tok = AutoTokenizer.from_pretrained(tokenizer_folder or folder, local_files_only=True)
    t5 = AutoConfig.from_pretrained(folder, local_files_only=True).model_type in ("t5", "mt5")
    model = (T5EncoderModel if t5 else AutoModel).from_pretrained(folder, local_files_only=True).eval()
    ids = tok(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=ids.input_ids, attention_mask=ids.attention_mask)[0], ids.attention_mask


def encode(tmp_path, *args):
    assert cli_main(["encode-text", "--device", "cpu", *args]) == 0


def tiny_checkpoint(tmp_path, family, **overrides):
    preset = {"latte_t2v": "Latte-T2V-tiny", "hunyuan": "HunyuanDiT-tiny"}[family]
    config = make_config(family, {"skip": True} if family == "latte_t2v" else {}, preset=preset)
    model = randomize(build_model(family, config), seed=5).eval()
    path = tmp_path / f"{family}.safetensors"
    save_safetensors(model.state_dict(), str(path), family, config)
    return model, str(path)


# ---------------------------------------------------------------------------- Latte T2V


def test_latte_t2v_prompt_file(encoders, tmp_path, capsys):
    out = tmp_path / "prompt.safetensors"
    encode(tmp_path, "--family", "latte_t2v", "--text-encoder", encoders["t5"], "--prompt", "A Cat walks on the BEACH",
           "--max-length", "12", "-o", str(out))
    assert "wrote" in capsys.readouterr().out
    t = load_file(str(out))
    assert sorted(t) == ["negative_prompt_attention_mask", "negative_prompt_embeds", "prompt_attention_mask", "prompt_embeds"]
    assert t["prompt_embeds"].shape == t["negative_prompt_embeds"].shape == (1, 12, 32)
    assert t["prompt_embeds"].dtype == t["negative_prompt_embeds"].dtype == torch.float32
    assert t["prompt_attention_mask"].dtype == torch.int64
    assert t["prompt_attention_mask"].tolist() == [[1] * 7 + [0] * 5]  # 6 words + </s>, padded to 12
    # the authors' pipeline cuts the negative to the prompt's tokens: the prompt's mask on the negative's states
    assert torch.equal(t["negative_prompt_attention_mask"], t["prompt_attention_mask"])
    states, mask = by_hand(encoders["t5"], ["a cat walks on the beach"], 12)  # lowercased, as Latte's pipeline
    assert torch.equal(t["prompt_embeds"], states) and torch.equal(t["prompt_attention_mask"], mask)
    assert torch.equal(t["negative_prompt_embeds"], by_hand(encoders["t5"], [""], 12)[0])
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["caption"] == "A Cat walks on the BEACH" and meta["family"] == "latte_t2v" and meta["negative_prompt"] == ""
    # written like the checkpoints (loading.write_safetensors): readable as the user's umask allows, not 0600
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o666 & ~umask


def test_latte_t2v_file_samples_and_its_mask_equals_the_authors_cut(encoders, tmp_path, capsys):
    out = tmp_path / "p.safetensors"
    encode(tmp_path, "--family", "latte_t2v", "--text-encoder", encoders["t5"], "--prompt", "a red ball", "-o", str(out),
           "--negative-prompt", "snow", "--max-length", "10")
    model, ckpt = tiny_checkpoint(tmp_path, "latte_t2v")
    args = ["sample", ckpt, "--text-embeddings", str(out), "--steps", "3", "--frames", "2", "--size", "8", "--guidance", "3",
            "--device", "cpu", "-o", str(tmp_path / "v.mp4")]
    assert cli_main(args) == 0
    latents = load_file(str(tmp_path / "v.latents.safetensors"))["latents"]
    assert latents.shape == (1, 4, 2, 8, 8) and torch.isfinite(latents).all()

    t = load_file(str(out))
    keep = int(t["prompt_attention_mask"].sum())  # 3 words + </s>
    assert keep == 4
    req = dict(frames=2, size=8, steps=3, guidance=3.0)
    masked = generate(model, Request("latte_t2v", text=t, **req)).sample
    cut = {"prompt_embeds": t["prompt_embeds"][:, :keep], "negative_prompt_embeds": t["negative_prompt_embeds"][:, :keep]}
    assert_close(masked, generate(model, Request("latte_t2v", text=cut, **req)).sample, rtol=1e-4)
    no_negative = {k: v for k, v in t.items() if not k.startswith("negative_")}
    assert not torch.allclose(masked, generate(model, Request("latte_t2v", text=no_negative, **req)).sample)


def test_captions_file_one_file_per_line(encoders, tmp_path, capsys):
    captions = tmp_path / "captions.txt"
    captions.write_text("a cat on the beach\n\n  a dog runs in snow  \nred ball at sunset\n")
    encode(tmp_path, "--family", "latte_t2v", "--text-encoder", encoders["t5"], "--captions", str(captions),
           "-o", str(tmp_path / "out"), "--batch-size", "2")
    assert sorted(os.listdir(tmp_path / "out")) == ["00001.safetensors", "00003.safetensors", "00004.safetensors"]
    loaded = te.load_text_encoders("latte_t2v", [encoders["t5"]])
    for name, caption in [("00001", "a cat on the beach"), ("00003", "a dog runs in snow"), ("00004", "red ball at sunset")]:
        t = load_file(str(tmp_path / "out" / f"{name}.safetensors"))
        assert t["prompt_embeds"].shape == (1, 120, 32) and t["prompt_attention_mask"].shape == (1, 120)  # Latte's 120
        alone = te.encode_captions([caption], "latte_t2v", loaded)
        assert alone.keys() == t.keys()
        for k in t:
            assert_close(t[k].double(), alone[k].double(), rtol=1e-5)
    # one file of them all (for sample-many): row i the i-th caption, the same tensors
    encode(tmp_path, "--family", "latte_t2v", "--text-encoder", encoders["t5"], "--captions", str(captions),
           "-o", str(tmp_path / "all.safetensors"), "--batch-size", "2")
    both = load_file(str(tmp_path / "all.safetensors"))
    assert both.keys() == t.keys() and both["prompt_embeds"].shape == (3, 120, 32)
    for row, name in enumerate(["00001", "00003", "00004"]):
        one = load_file(str(tmp_path / "out" / f"{name}.safetensors"))
        assert all(torch.equal(both[k][row:row + 1], one[k]) for k in one)
    with safe_open(str(tmp_path / "all.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["captions"]) == ["a cat on the beach", "a dog runs in snow", "red ball at sunset"]

    half = te.encode_captions(["a cat on the beach"], "latte_t2v", encoders["t5"], dtype=torch.bfloat16, max_lengths=[8])
    assert half["prompt_embeds"].dtype == torch.float32  # stored as float32 whatever the encoder ran in
    full = te.encode_captions(["a cat on the beach"], "latte_t2v", loaded, max_lengths=[8])
    assert_close(half["prompt_embeds"], full["prompt_embeds"], rtol=0.05)


# ---------------------------------------------------------------------------- Hunyuan-DiT


def test_hunyuan_pipeline_folder_file_and_sampling(encoders, tmp_path, capsys):
    pipe = encoders["hunyuan"]
    out = tmp_path / "h.safetensors"
    encode(tmp_path, "--family", "hunyuan", "--text-encoder", pipe, "--prompt", "a cat at sunset", "-o", str(out),
           "--max-length", "7", "--max-length-2", "9")  # HunyuanDiT-tiny's text_len, text_len_t5
    t = load_file(str(out))
    assert sorted(t) == sorted(p + k for p in ("", "negative_") for k in
                               ("prompt_embeds", "prompt_attention_mask", "prompt_embeds_2", "prompt_attention_mask_2"))
    assert t["prompt_embeds"].shape == (1, 7, 32) and t["prompt_embeds_2"].shape == (1, 9, 48)
    assert t["prompt_attention_mask"].tolist() == [[1] * 6 + [0] * 1]  # [CLS] 4 words [SEP]
    assert t["prompt_attention_mask_2"].tolist() == [[1] * 5 + [0] * 4]  # 4 words </s>
    # the negative keeps its own masks, as diffusers' HunyuanDiTPipeline passes them
    assert t["negative_prompt_attention_mask"].tolist() == [[1] * 2 + [0] * 5]
    assert t["negative_prompt_attention_mask_2"].tolist() == [[1] + [0] * 8]
    for key, sub, length in [("prompt_embeds", "", 7), ("prompt_embeds_2", "_2", 9)]:
        model_dir, tok_dir = os.path.join(pipe, "text_encoder" + sub), os.path.join(pipe, "tokenizer" + sub)
        states, _ = by_hand(model_dir, ["a cat at sunset"], length, tok_dir)
        assert torch.equal(t[key], states)
        assert torch.equal(t["negative_" + key], by_hand(model_dir, [""], length, tok_dir)[0])
        assert t[key].dtype == torch.float32 and t[key.replace("embeds", "attention_mask")].dtype == torch.int64

    # the same from separate folders, tokenizers beside them: a BERT in Hunyuan-DiT's own layout
    # (t2i/clip_text_encoder/ + t2i/tokenizer/) and the pipeline's text_encoder_2/ (+ tokenizer_2/)
    bert = tmp_path / "t2i" / "clip_text_encoder"
    save_bert(bert, 32, tokenizer=False)
    save_tokenizer(tmp_path / "t2i" / "tokenizer", bert=True)
    apart = tmp_path / "apart.safetensors"
    encode(tmp_path, "--family", "hunyuan", "--text-encoder", str(bert), "--text-encoder-2",
           os.path.join(pipe, "text_encoder_2"), "--prompt", "a cat at sunset", "-o", str(apart), "--max-length", "7",
           "--max-length-2", "9")
    again = load_file(str(apart))
    assert all(torch.equal(again[k], t[k]) for k in t)

    _, ckpt = tiny_checkpoint(tmp_path, "hunyuan")
    assert cli_main(["sample", ckpt, "--text-embeddings", str(out), "--steps", "3", "--size", "8", "--guidance", "3",
                     "--device", "cpu", "-o", str(tmp_path / "img.png")]) == 0
    latents = load_file(str(tmp_path / "img.latents.safetensors"))["latents"]
    assert latents.shape == (1, 4, 8, 8) and torch.isfinite(latents).all()


# ---------------------------------------------------------------------------- training sidecars


def test_caption_dir_writes_the_sidecars_video_folder_reads(encoders, tmp_path, capsys):
    from test_training_data import write_video
    from torch.utils.data import DataLoader
    from training.data import VIDEO_EXTENSIONS, VideoFolder, _sidecar_path
    from training.train import model_inputs

    assert te.VIDEO_EXTENSIONS == VIDEO_EXTENSIONS and te.sidecar_path("x/a.b.mp4") == _sidecar_path("x/a.b.mp4")
    root = tmp_path / "videos"
    write_video(root / "a.mp4", num=4)
    write_video(root / "sub" / "b.mkv", num=4)
    (root / "a.txt").write_text("a cat walks on the beach\n")
    (root / "sub" / "b.txt").write_text("A red ball")
    (root / "notes.txt").write_text("not a caption: no video of this name")
    encode(tmp_path, "--family", "latte_t2v", "--text-encoder", encoders["t5"], "--caption-dir", str(root), "--max-length", "10")
    assert os.path.isfile(root / "a.safetensors") and os.path.isfile(root / "sub" / "b.safetensors")
    assert not os.path.exists(root / "notes.safetensors")
    side = load_file(str(root / "a.safetensors"))
    assert sorted(side) == ["prompt_attention_mask", "prompt_embeds"]  # the prompt only
    assert side["prompt_embeds"].shape == (1, 10, 32) and side["prompt_attention_mask"].tolist() == [[1] * 7 + [0] * 3]

    ds = VideoFolder(str(root), num_frames=2, size=16, require_text=True)
    item = ds[0]
    assert torch.equal(item["prompt_embeds"], side["prompt_embeds"][0]) and item["prompt_embeds"].dtype == torch.float32
    assert item["prompt_attention_mask"].tolist() == [1] * 7 + [0] * 3 and item["prompt_attention_mask"].dtype == torch.int64
    assert ds[1]["prompt_attention_mask"].tolist() == [1] * 4 + [0] * 6  # "a red ball" </s>
    x, cond, _ = model_inputs("latte_t2v", next(iter(DataLoader(ds, batch_size=2))), 0)
    assert cond["encoder_hidden_states"].shape == (2, 10, 32) and cond["encoder_attention_mask"].shape == (2, 10)
    config = make_config("latte_t2v", {"in_channels": 3, "out_channels": 6, "sample_size": 16}, preset="Latte-T2V-tiny")
    with torch.no_grad():  # the sidecars condition the model training trains
        out = build_model("latte_t2v", config).eval()(x, torch.tensor([10, 500]), **cond)
    assert out.shape == (2, 6, 2, 16, 16) and torch.isfinite(out).all()


# ---------------------------------------------------------------------------- errors


def error_cases(encoders, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "blank.txt").write_text("\n  \n")
    save_t5(tmp_path / "no_tokenizer", 32, tokenizer=False)
    missing_caption = tmp_path / "vids"
    missing_caption.mkdir()
    for name in ("a", "c"):
        (missing_caption / f"{name}.mp4").write_bytes(b"")
    (missing_caption / "a.txt").write_text("a cat")
    empty_caption = tmp_path / "vids2"
    empty_caption.mkdir()
    (empty_caption / "a.mp4").write_bytes(b"")
    (empty_caption / "a.txt").write_text(" \n")
    t5, pipe, out = encoders["t5"], encoders["hunyuan"], str(tmp_path / "o.safetensors")
    bert = os.path.join(pipe, "text_encoder")
    return [
        (["--family", "latte_t2v", "--text-encoder", str(tmp_path / "empty"), "--prompt", "a cat", "-o", out],
         r"--text-encoder '.*empty' has no config\.json: expected a transformers T5 encoder"),
        (["--family", "latte_t2v", "--text-encoder", str(tmp_path / "nowhere"), "--prompt", "a cat", "-o", out],
         r"'.*nowhere' does not exist or is not a folder"),
        (["--family", "latte_t2v", "--text-encoder", str(tmp_path / "no_tokenizer"), "--prompt", "a cat", "-o", out],
         r"no tokenizer for '.*no_tokenizer': expected one of tokenizer\.json"),
        (["--family", "latte_t2v", "--text-encoder", t5, "--captions", str(tmp_path / "blank.txt"), "-o", str(tmp_path / "d")],
         r"caption file '.*blank\.txt' is empty: expected one caption per line"),
        (["--family", "latte_t2v", "--text-encoder", t5, "--captions", str(tmp_path / "none.txt"), "-o", str(tmp_path / "d")],
         r"caption file '.*none\.txt' does not exist"),
        (["--family", "latte_t2v", "--text-encoder", t5, "--captions", str(tmp_path / "blank.txt"), "-o", str(tmp_path / "blank.txt")],
         r"--output '.*blank\.txt' is a file: with a caption file give a folder or a \.safetensors path"),
        (["--family", "dit", "--text-encoder", t5, "--prompt", "a cat", "-o", out],
         r"family 'dit' has no text conditioning; text families: latte_t2v \(T5"),
        (["--family", "hunyuan", "--text-encoder", bert, "--prompt", "a cat", "-o", out],
         r"hunyuan needs a second text encoder, the mT5 encoder: give --text-encoder-2 DIR"),
        (["--family", "hunyuan", "--text-encoder", t5, "--text-encoder-2", t5, "--prompt", "a cat", "-o", out],
         r"config\.json is a 't5' model, expected the CLIP-like BERT encoder"),
        (["--family", "latte_t2v", "--text-encoder", t5, "--text-encoder-2", t5, "--prompt", "a cat", "-o", out],
         r"latte_t2v takes --text-encoder \(T5 encoder"),
        (["--family", "latte_t2v", "--text-encoder", t5, "--max-length-2", "9", "--prompt", "a cat", "-o", out],
         r"1 text encoder\(s\), so 1 max length"),
        (["--family", "latte_t2v", "--text-encoder", t5, "--prompt", "a cat"], r"--output is needed"),
        (["--family", "latte_t2v", "--text-encoder", t5, "--prompt", "  ", "-o", out], r"the prompt is empty"),
        (["--family", "latte_t2v", "--text-encoder", t5, "--caption-dir", str(missing_caption)],
         r"1 of 2 video\(s\) under '.*vids' have no caption file, e\.g\. '.*c\.txt' is missing"),
        (["--family", "latte_t2v", "--text-encoder", t5, "--caption-dir", str(empty_caption)],
         r"caption file '.*a\.txt' is empty \(the caption of '.*a\.mp4'\)"),
        (["--family", "latte_t2v", "--text-encoder", t5, "--caption-dir", str(tmp_path / "empty")],
         r"no video files in '.*empty'"),
        (["--family", "latte_t2v", "--text-encoder", t5, "--caption-dir", str(empty_caption), "-o", out],
         r"--caption-dir writes each sidecar beside its video: no --output"),
        (["--family", "hunyuan", "--text-encoder", pipe, "--caption-dir", str(empty_caption)],
         r"training/ does not train hunyuan"),
    ]


def test_errors_name_the_file_and_what_was_expected(encoders, tmp_path, capsys):
    import re

    cases = error_cases(encoders, tmp_path)
    capsys.readouterr()  # the progress bars of building them
    for args, message in cases:
        assert cli_main(["encode-text", "--device", "cpu", *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("skipdit: error: ") and err.count("\n") == 1, err
        assert re.search(message, err), (message, err)
    assert not os.path.exists(tmp_path / "o.safetensors") and not os.path.exists(tmp_path / "d")
