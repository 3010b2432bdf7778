"""Skip branches as an add-on (skipdit_core/skip_branches.py, the CLI's extract-branches / --skip-branches, and the
ComfyUI-free block patches of Load Skip Branches, nodes/branch_patch.py): a Skip-Wan's branches extracted and put
back on its base equal the full Skip-Wan exactly; the file is a few percent of the model; bad files and bases that
do not fit are refused with one line."""
from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from helpers import randomize
from nodes.branch_patch import BRANCHES_KEY, STORE_KEY, SkipBranchPatch, SkipBranchSet
from skipdit_core.cli import main as cli_main
from skipdit_core.loading import CheckpointError, inspect_checkpoint, save_safetensors
from skipdit_core.models.wan import WAN_PRESETS, WanConfig, WanModel
from skipdit_core.pipeline import Request, generate
from skipdit_core.skip_branches import (
    FORMAT, BranchFileError, attach_branches, branch_keys, branch_parameters, extract_branches, is_branches_file,
    load_branches,
)
from skipdit_core.skip_cache import SkipCacheConfig

torch.set_num_threads(1)


def tiny(**kw) -> WanConfig:
    return WanConfig(**{**WAN_PRESETS["tiny"], **kw})


@pytest.fixture(scope="module", params=["replace", "residual"])
def skip_wan(request):
    """A Skip-Wan with the paper's fusion, and one with the residual fusion the conversion recipes use."""
    return randomize(WanModel(tiny(num_layers=6, num_skips=2, skip_fusion=request.param)).eval(), seed=7)


def base_of(skip: WanModel) -> WanModel:
    """The released model the Skip-Wan adds its branches to: the same weights without them."""
    base = WanModel(replace(skip.config, num_skips=0, skip_fusion="replace")).eval()
    base.load_state_dict({k: v.clone() for k, v in skip.state_dict().items() if not k.startswith("skip_")})
    return base


def inputs(cfg: WanConfig, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, cfg.in_channels, 2, 4, 6, generator=g), torch.tensor([950.0, 120.0]),
            torch.randn(2, cfg.text_len, cfg.text_dim, generator=g))


@pytest.fixture(scope="module")
def files(tmp_path_factory, skip_wan):
    root = tmp_path_factory.mktemp("branches")
    full, base = root / "skip-wan.safetensors", root / "wan-base.safetensors"
    save_safetensors(skip_wan.state_dict(), full, "wan", skip_wan.config)
    save_safetensors(base_of(skip_wan).state_dict(), base, "wan", base_of(skip_wan).config)
    branches = root / "branches.safetensors"
    info = extract_branches(skip_wan, branches, base="wan-base.safetensors")
    return root, full, base, branches, info


# --------------------------------------------------------------------------- extract -> attach


def test_extract_then_attach_equals_the_full_skip_wan(skip_wan, files):
    _, _, _, path, info = files
    assert (info.num_layers, info.num_skips, info.dim, info.in_channels, info.base, info.fusion) == (
        6, 2, 64, 4, "wan-base.safetensors", skip_wan.config.skip_fusion)
    sd, read = load_branches(path)
    assert read == info and sorted(sd) == sorted(branch_keys(2))
    assert all(torch.equal(sd[k], skip_wan.state_dict()[k]) for k in sd)
    base = base_of(skip_wan)
    model = attach_branches(base, path)
    assert model.config == skip_wan.config and model.stack.pairs() == skip_wan.stack.pairs() == [(1, 4), (0, 5)]
    assert model.state_dict().keys() == skip_wan.state_dict().keys()
    assert all(torch.equal(a, skip_wan.state_dict()[k]) for k, a in model.state_dict().items())
    assert model.blocks[0].ffn[0].weight.data_ptr() == base.blocks[0].ffn[0].weight.data_ptr()  # shared, not copied
    x, t, ctx = inputs(skip_wan.config)
    with torch.no_grad():
        assert torch.equal(model(x, t, ctx), skip_wan(x, t, ctx))
        assert not torch.equal(base(x, t, ctx), skip_wan(x, t, ctx))  # the branches do something
    req = Request("wan", text={"prompt_embeds": ctx[:1]}, frames=2, size=4, steps=6, guidance=3.0)
    config = SkipCacheConfig(interval=2, start=1000, end=0, depth=2)  # k = S: both skips cross the cut
    assert torch.equal(generate(model, req, config).sample, generate(skip_wan, req, config).sample)


def test_extract_from_a_state_dict_a_comfyui_prefixed_one_and_a_file(skip_wan, files, tmp_path):
    root, full, _, path, _ = files
    reference = load_file(str(path))
    sources = {"sd": skip_wan.state_dict(),
               "comfy": {"model.diffusion_model." + k: v for k, v in skip_wan.state_dict().items()}, "file": str(full)}
    fusion = skip_wan.config.skip_fusion
    for name, source in sources.items():
        # A bare state dict does not say its fusion; a file's config does.
        info = extract_branches(source, tmp_path / f"{name}.safetensors", fusion=None if name == "file" else fusion)
        got = load_file(str(tmp_path / f"{name}.safetensors"))
        assert got.keys() == reference.keys() and all(torch.equal(got[k], reference[k]) for k in got), name
        assert (info.num_layers, info.num_skips, info.dim, info.in_channels, info.fusion) == (6, 2, 64, 4, fusion)
    other = "replace" if fusion == "residual" else "residual"
    with pytest.raises(ValueError, match=f"fusion='{other}' given, but .* has skip_fusion '{fusion}'"):
        extract_branches(str(full), tmp_path / "wrong.safetensors", fusion=other)
    # a file without our metadata does not say its fusion (the keys are the same for both): unknown, not guessed
    bare = tmp_path / "bare-skip-wan.safetensors"
    save_file({k: v.contiguous() for k, v in skip_wan.state_dict().items()}, str(bare))
    assert inspect_checkpoint(str(bare), overrides={"num_heads": 4}).skip_fusion is None
    assert inspect_checkpoint(str(full)).skip_fusion == fusion
    half = extract_branches(skip_wan, tmp_path / "half.safetensors", dtype=torch.float16)
    assert half.dtypes == ("float16",)
    # fp16 branches on an fp32 base: cast to the base's dtype, as loading the whole Skip-Wan at fp32 would
    model = attach_branches(base_of(skip_wan), tmp_path / "half.safetensors")
    assert model.skip_linears[0].linear.weight.dtype == torch.float32


def test_the_file_is_a_few_percent_of_the_model(skip_wan, files):
    _, _, _, path, info = files
    total = sum(p.numel() for p in skip_wan.parameters())
    branch = sum(p.numel() for n, p in skip_wan.named_parameters() if n.startswith("skip_"))
    assert info.parameters == branch == branch_parameters(2, 64) and info.skip_model_parameters == total
    assert info.fraction == pytest.approx(branch / total)
    # The released sizes, built on the meta device (no memory): Wan 2.1 1.3B with 15 skips, 14B with 20.
    for preset, skips, share in (("1.3B", 15, 0.0476), ("14B", 20, 0.0684)):
        with torch.device("meta"):
            model = WanModel(WanConfig(**WAN_PRESETS[preset], num_skips=skips))
        n = sum(p.numel() for p in model.parameters())
        assert branch_parameters(skips, model.config.dim) == sum(
            p.numel() for name, p in model.named_parameters() if name.startswith("skip_"))
        assert branch_parameters(skips, model.config.dim) / n == pytest.approx(share, abs=5e-4), preset


# --------------------------------------------------------------------------- refused, with one line


def _rewrite(path, out, drop=(), add=None, metadata=None, shapes=None):
    sd = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    for k in drop:
        del sd[k]
    sd.update(add or {})
    for k, shape in (shapes or {}).items():
        sd[k] = torch.zeros(shape)
    meta.update(metadata or {})
    save_file(sd, str(out), metadata={k: v for k, v in meta.items() if v is not None})
    return out


def test_bad_files_are_refused_naming_file_key_and_values(skip_wan, files, tmp_path):
    _, full, _, path, _ = files

    def refused(p, **base) -> str:
        with pytest.raises(BranchFileError) as e:
            load_branches(p, **base)
        message = str(e.value)
        assert "\n" not in message and message.startswith(str(p)), message
        return message

    assert "not a skip-branches file" in refused(full) and "skipdit extract-branches" in refused(full)
    pickle = tmp_path / "branches.pt"
    torch.save(load_file(str(path)), pickle)
    assert "not a skip-branches file: not a .safetensors file" in refused(pickle)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-100])
    assert "truncated" in refused(truncated)
    assert "key skip_linears.1.linear.bias is missing" in refused(
        _rewrite(path, tmp_path / "missing.safetensors", drop=["skip_linears.1.linear.bias"]))
    assert "unexpected key blocks.0.modulation" in refused(
        _rewrite(path, tmp_path / "extra.safetensors", add={"blocks.0.modulation": torch.zeros(1, 6, 64)}))
    assert "shape mismatch at skip_linears.0.linear.weight: expected (64, 128) (width 64), the file has (64, 64)" in refused(
        _rewrite(path, tmp_path / "shape.safetensors", shapes={"skip_linears.0.linear.weight": (64, 64)}))
    assert "metadata skipdit.dim must be an integer, the file has 'wide'" in refused(
        _rewrite(path, tmp_path / "meta.safetensors", metadata={"skipdit.dim": "wide"}))
    assert "metadata skipdit.skip_fusion: skip_fusion must be one of replace, residual, got 'add'" in refused(
        _rewrite(path, tmp_path / "fusion.safetensors", metadata={"skipdit.skip_fusion": "add"}))
    assert "shape mismatch at skip_norms.0.weight: expected (256,) (width 128)" in refused(
        _rewrite(path, tmp_path / "dim.safetensors", metadata={"skipdit.dim": "128"}))
    assert "3 skips do not fit 4 blocks" in refused(
        _rewrite(path, tmp_path / "deep.safetensors", metadata={"skipdit.num_layers": "4", "skipdit.num_skips": "3"}))
    assert "no such file" in refused(tmp_path / "absent.safetensors")
    # against the base model it is put on
    assert "made for a Wan of 6 blocks, but the base model has 30 blocks" in refused(path, num_layers=30)
    assert "made for a Wan of width 64, but the base model has width 1536" in refused(path, dim=1536)
    assert "made for a Wan with 4 latent channels, but the base model has 36 latent channels" in refused(path, in_channels=36)
    with pytest.raises(BranchFileError, match="of 6 blocks, but the base model has 4 blocks"):
        attach_branches(WanModel(tiny()), path)
    with pytest.raises(BranchFileError, match="already has 2 long skips"):
        attach_branches(skip_wan, path)
    with pytest.raises(ValueError, match="attach to a Wan"):
        attach_branches(nn.Linear(2, 2), path)
    with pytest.raises(CheckpointError, match="has no skip branches"):
        extract_branches(base_of(skip_wan), tmp_path / "none.safetensors")
    assert is_branches_file(path) and not is_branches_file(full) and not is_branches_file(truncated.parent / "absent")


# --------------------------------------------------------------------------- the command


def test_cli_extract_info_and_sample_with_skip_branches(files, capsys):
    root, full, base, _, made = files
    out = root / "cli-branches.safetensors"
    assert cli_main(["extract-branches", str(full), "-o", str(out), "--base", "wan-base.safetensors",
                     "--fusion", made.fusion]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}: the 2 skip branches alone" in printed and "% of the Skip-Wan's" in printed
    assert cli_main(["info", str(out)]) == 0
    assert f"skips       2: blocks 0..1 feed blocks 5..4, {made.fusion} fusion" in capsys.readouterr().out
    assert cli_main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["format"], info["num_skips"], info["base"], info["skip_fusion"]) == (
        FORMAT, 2, "wan-base.safetensors", made.fusion)
    assert 0 < info["fraction"] < 0.1
    emb = root / "prompt.safetensors"
    save_file({"prompt_embeds": torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(2))}, str(emb))
    common = ["--text-embeddings", str(emb), "--frames", "2", "--size", "4", "--steps", "4", "--guidance", "3",
              "--device", "cpu", "--cache-interval", "2", "--cache-start", "1000", "--cache-end", "0"]
    assert cli_main(["sample", str(full), *common, "-o", str(root / "full.mp4")]) == 0
    assert cli_main(["sample", str(base), "--skip-branches", str(out), *common, "-o", str(root / "attached.mp4")]) == 0
    printed = capsys.readouterr().out
    a, b = (load_file(str(root / f"{n}.latents.safetensors"))["latents"] for n in ("full", "attached"))
    assert torch.equal(a, b) and printed.count("2 full, 2 cached of 4 steps") == 2
    # branches that do not fit the checkpoint: one line, exit 2
    assert cli_main(["sample", str(full), "--skip-branches", str(out), *common, "-o", str(root / "x.mp4")]) == 2
    assert "already has 2 long skips" in capsys.readouterr().err


# --------------------------------------------------------------------------- the ComfyUI patches, without ComfyUI


class CoreLikeBlock(nn.Module):
    """A block called the way ComfyUI's WanModel.forward_orig calls one: through the `double_block` replace patch of
    its index when there is one (args img / txt / vec / pe / transformer_options, extra original_block)."""

    def __init__(self, block: nn.Module, index: int, options: list):
        super().__init__()
        self.block, self.index, self.options = block, index, options

    def forward(self, x, e0, context, rope):
        options = self.options[0]
        patch = options.get("patches_replace", {}).get("dit", {}).get(("double_block", self.index))
        if patch is None:
            return self.block(x, e0, context, rope)
        args = {"img": x, "txt": context, "vec": e0, "pe": rope, "transformer_options": options}
        return patch(args, {"original_block": lambda a: {"img": self.block(a["img"], a["vec"], a["txt"], a["pe"])}})["img"]


def core_like(base: WanModel) -> tuple[WanModel, list]:
    model, options = copy.deepcopy(base), [{}]
    model.blocks = nn.ModuleList([CoreLikeBlock(b, i, options) for i, b in enumerate(model.blocks)])
    return model, options


def patched_options(branch_set: SkipBranchSet, inner=None) -> dict:
    return {BRANCHES_KEY: branch_set, "patches_replace": {"dit": {
        ("double_block", i): SkipBranchPatch(branch_set, i, (inner or {}).get(i)) for i in branch_set.blocks()}}}


def test_block_patches_on_a_core_like_loop_equal_the_skip_wan(skip_wan, files):
    _, _, _, path, _ = files
    branch_set = SkipBranchSet(*load_branches(path))
    assert branch_set.blocks() == [0, 1, 4, 5] and branch_set.stack.pairs() == [(1, 4), (0, 5)]
    model, holder = core_like(base_of(skip_wan))
    x, t, ctx = inputs(skip_wan.config, seed=3)
    calls = []
    inner = {4: lambda args, extra: calls.append(4) or extra["original_block"](args)}  # another node's patch
    with torch.no_grad():
        ref = skip_wan(x, t, ctx)
        holder[0] = options = patched_options(branch_set, inner)
        out = model(x, t, ctx)
        assert torch.equal(out, ref), float((out - ref).abs().max())  # the same operations in the same order
        assert calls == [4] and STORE_KEY not in options  # the inner patch ran; the outputs went with the call
        # Two calls interleaved through two copies of the options (two threads / CFG halves): each its own outputs.
        holder[0] = dict(options)
        first = model(x[:1], t[:1], ctx[:1])
        assert torch.allclose(first, ref[:1], rtol=0, atol=1e-6 * float(ref.abs().max()))
    # A receiver whose source did not run in this call: a clear error, not a stale tensor.
    patch = options["patches_replace"]["dit"][("double_block", 5)]
    with pytest.raises(RuntimeError, match="block 5 needs the output of block 0, which did not run"):
        patch({"img": torch.zeros(1, 4, 64), "transformer_options": {}}, {"original_block": None})
    # The settings survive any copy of a model's options as one shared object; the outputs never travel.
    from nodes.branch_patch import _Outputs

    copied = copy.deepcopy({**options, STORE_KEY: _Outputs({0: torch.zeros(3)})})
    assert copied[BRANCHES_KEY] is branch_set and copied[STORE_KEY] == {}
    assert copied["patches_replace"]["dit"][("double_block", 0)].branches is branch_set


def test_branches_keep_their_dtype_and_follow_the_input(skip_wan, files):
    _, _, _, path, _ = files
    sd, info = load_branches(path)
    branch_set = SkipBranchSet({k: v.half() for k, v in sd.items()}, info)
    assert branch_set.dtype == torch.float16
    h = torch.randn(1, 5, 64, dtype=torch.bfloat16)
    out = branch_set.fuse(1, h, h)
    assert out.dtype == torch.bfloat16 and branch_set.dtype == torch.float16  # the stored copy is unchanged
    ref = skip_wan.fuse(1, h.float(), h.float())
    assert torch.allclose(out.float(), ref, atol=0.05 * float(ref.abs().max().detach()))
