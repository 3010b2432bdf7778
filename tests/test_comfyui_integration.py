"""The node pack inside a real ComfyUI. Skipped unless COMFYUI_PATH points at a ComfyUI checkout:

    COMFYUI_PATH=/path/to/ComfyUI python -m pytest tests/test_comfyui_integration.py

Run it with the Python of ComfyUI's environment (it starts ComfyUI with the same interpreter; set
COMFYUI_PYTHON to use another). One `--cpu` server is started for the module, with a temporary
`--base-directory` whose custom_nodes/ holds a link to this repository and whose models/ holds tiny
random models written with skipdit_core. Checks that need ComfyUI's Python objects (ComfyUI's own
Hunyuan-DiT with synthetic text conditioning, a test-size T5 encoder, forward-hook block counts, the
pixel clamp against skipdit_core's sampler, the bundled-models folder) run in one separate process
(tests/comfyui_inprocess.py). The server helpers live in tests/comfyui_server.py.
"""
from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.error
from pathlib import Path

import pytest
import torch

from comfyui_inprocess import (
    SKIP_WAN_BASE, SKIP_WAN_BRANCHES, SKIP_WAN_FULL, SKIP_WAN_RESIDUAL_BRANCHES, SKIP_WAN_RESIDUAL_FULL,
)
from comfyui_server import COMFYUI_PATH, PACK_NAME, ROOT, Server, child_env, comfyui_python, error_text, make_base_dir, write_model

pytestmark = pytest.mark.skipif(not COMFYUI_PATH, reason="COMFYUI_PATH is not set")

NODE_IDS = [
    "SkipDiTModelLoader", "SkipDiTLoadSkipBranches", "SkipDiTApplySkipCache", "SkipDiTClassLabel", "SkipDiTLatteT2VTextEncode",
    "SkipDiTEmptyLatteLatent", "SkipDiTDecodeVideo",
]
LATTE = "latte-tiny-pixels-skip.safetensors"
SUMMARY = re.compile(r"Skip-Cache \[(?P<label>[^\]]*)\]: (?P<interrupted>interrupted after )?(?P<full>\d+) full \+ "
                     r"(?P<cached>\d+) cached of (?P<steps>\d+) steps .*?; (?P<run>\d+) of (?P<all>\d+) blocks run")


# ----------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    base = make_base_dir(tmp_path_factory.mktemp("comfy-base"))
    own, core = base / "models/skipdit", base / "models/diffusion_models"
    write_model(own / LATTE, "latte", "Latte-tiny", in_channels=3, skip=True)  # pixel space, 4 pairs, 2 long skips
    write_model(own / "latte-tiny-pixels-v.safetensors", "latte", "Latte-tiny", in_channels=3, skip=True, prediction="v")
    write_model(own / "latte-t2v-tiny-skip.safetensors", "latte_t2v", "Latte-T2V-tiny", skip=True)
    write_model(core / "dit-tiny-skip.safetensors", "dit", "DiT-tiny", skip=True)
    write_model(core / "dit-tiny-vanilla.safetensors", "dit", "DiT-tiny")
    # The smallest Hunyuan-DiT ComfyUI's own model can hold: its text layers are full size (42 M parameters).
    write_model(own / "hunyuan-core-tiny.safetensors", "hunyuan", None, dtype=torch.float16, depth=6, hidden_size=128,
                num_heads=16, mlp_ratio=4.0, use_style_cond_and_image_meta_size=False)
    # The smallest Wan ComfyUI's model detection reads (one head of 128, umT5's 4096-wide text input), twice: the
    # high-noise and low-noise experts of a Wan 2.2 A14B-style chain.
    for name, seed in (("wan-core-tiny.safetensors", 1), ("wan-core-tiny-low.safetensors", 2)):
        write_model(core / name, "wan", None, seed=seed, dim=128, ffn_dim=256, num_layers=6, num_heads=1, in_channels=16,
                    out_channels=16, text_dim=4096, freq_dim=256, text_len=16)
    write_skip_wan(base)
    (base / "models/loras").mkdir()
    g = torch.Generator().manual_seed(4)  # a rank-4 LoRA on the first spatial block's qkv, kohya key names
    from safetensors.torch import save_file

    save_file({"lora_unet_blocks_0_attn_qkv.lora_up.weight": torch.randn(384, 4, generator=g) * 0.5,
               "lora_unet_blocks_0_attn_qkv.lora_down.weight": torch.randn(4, 128, generator=g) * 0.5,
               "lora_unet_blocks_0_attn_qkv.alpha": torch.tensor(4.0)}, str(base / "models/loras/latte-tiny-lora.safetensors"))
    g = torch.Generator().manual_seed(8)  # a rank-4 LoRA on the Skip-Wan base's block 0 self-attention q
    save_file({"lora_unet_blocks_0_self_attn_q.lora_up.weight": torch.randn(128, 4, generator=g) * 0.1,
               "lora_unet_blocks_0_self_attn_q.lora_down.weight": torch.randn(4, 128, generator=g) * 0.1,
               "lora_unet_blocks_0_self_attn_q.alpha": torch.tensor(4.0)}, str(base / "models/loras/wan-block0-lora.safetensors"))
    (own / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    return base


def write_skip_wan(base: Path) -> None:
    """A tiny Skip-Wan (8 blocks, 2 long skips, one head of 128, umT5's 4096-wide text input: what core detection
    reads): its base in models/diffusion_models/ (core Load Diffusion Model), the whole model in the base directory
    (for skipdit_core), its branches alone in models/skipdit_branches/ (Load Skip Branches), and branch files that
    do not fit it (another depth, another width, truncated)."""
    from dataclasses import replace

    from helpers import randomize
    from skipdit_core import models
    from skipdit_core.loading import save_safetensors
    from skipdit_core.skip_branches import branch_shapes, extract_branches, save_branches

    config = models.make_config("wan", dict(dim=128, ffn_dim=256, num_layers=8, num_heads=1, in_channels=16, out_channels=16,
                                            text_dim=4096, freq_dim=256, text_len=16, num_skips=2))
    torch.manual_seed(0)
    skip_wan = randomize(models.build_model("wan", config), seed=6)
    sd = skip_wan.state_dict()
    save_safetensors(sd, base / SKIP_WAN_FULL, "wan", config)
    save_safetensors({k: v for k, v in sd.items() if not k.startswith("skip_")}, base / "models/diffusion_models" / SKIP_WAN_BASE,
                     "wan", replace(config, num_skips=0))
    folder = base / "models/skipdit_branches"
    folder.mkdir(parents=True, exist_ok=True)
    extract_branches(skip_wan, folder / SKIP_WAN_BRANCHES, base=SKIP_WAN_BASE)
    g = torch.Generator().manual_seed(9)
    for name, layers, dim in (("skip-wan-10-blocks-branches.safetensors", 10, 128), ("skip-wan-width-256-branches.safetensors", 8, 256)):
        save_branches({k: torch.randn(shape, generator=g) for k, shape in branch_shapes(2, dim).items()}, folder / name, layers, dim,
                      in_channels=16)
    # the residual fusion on the same base weights
    residual = models.build_model("wan", replace(config, skip_fusion="residual"))
    residual.load_state_dict(sd)
    save_safetensors(sd, base / SKIP_WAN_RESIDUAL_FULL, "wan", residual.config)
    extract_branches(residual, folder / SKIP_WAN_RESIDUAL_BRANCHES, base=SKIP_WAN_BASE)
    data = (folder / SKIP_WAN_BRANCHES).read_bytes()
    (folder / "truncated-branches.safetensors").write_bytes(data[: len(data) // 2])


# ----------------------------------------------------------------------------- server


@pytest.fixture(scope="module")
def server(base_dir):
    with Server(base_dir) as srv:
        yield srv


def load_latent(base: Path, prefix: str) -> torch.Tensor:
    from safetensors.torch import load_file

    (path,) = sorted((base / "output" / "latents").glob(f"{prefix}_*.latent"))
    return load_file(str(path))["latent_tensor"]


def summaries(log: str) -> list[dict]:
    return [m.groupdict() for m in SUMMARY.finditer(log)]


def latte_prompt(prefix: str, n=None, seed=1, steps=10, cfg=4.0, dtype="default", sampler="euler", video=False) -> dict:
    p = {
        "1": {"class_type": "SkipDiTModelLoader", "inputs": {"checkpoint": LATTE, "weight_dtype": dtype}},
        "2": {"class_type": "SkipDiTClassLabel", "inputs": {"class_label": 2}},
        "3": {"class_type": "SkipDiTEmptyLatteLatent",
              "inputs": {"width": 8, "height": 8, "length": 4, "batch_size": 1, "space": "pixels (3 ch)"}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": "normal",
            "positive": ["2", 0], "negative": ["2", 1], "latent_image": ["3", 0], "denoise": 1.0}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": f"latents/{prefix}"}},
    }
    if n is not None:
        p["4"] = {"class_type": "SkipDiTApplySkipCache", "inputs": {
            "model": ["1", 0], "interval": n, "settings": "custom", "window_unit": "timesteps", "start": 1000.0,
            "end": 0.0, "depth": 1}}
        p["5"]["inputs"]["model"] = ["4", 0]
    if video:
        p["7"] = {"class_type": "SkipDiTDecodeVideo", "inputs": {"samples": ["5", 0]}}
        p["8"] = {"class_type": "CreateVideo", "inputs": {"images": ["7", 0], "fps": 8.0}}
        p["9"] = {"class_type": "SaveVideo", "inputs": {"video": ["8", 0], "filename_prefix": f"video/{prefix}",
                                                        "format": "auto", "codec": "auto"}}
    return p


# ----------------------------------------------------------------------------- through the server


def test_pack_imports_without_failure(server):
    log = server.log()
    pack_lines = [line for line in log.splitlines() if PACK_NAME in line]
    assert pack_lines, log[-3000:]
    assert not [line for line in pack_lines if "IMPORT FAILED" in line or "Cannot import" in line], pack_lines
    assert "Error while calling comfy_entrypoint" not in log
    info = server.get("/object_info")
    for node_id in NODE_IDS:
        assert node_id in info, f"{node_id} not registered"
        assert info[node_id]["python_module"] == f"custom_nodes.{PACK_NAME}"


def test_node_schemas_in_object_info(server):
    info = server.get("/object_info")
    loader = info["SkipDiTModelLoader"]["input"]["required"]
    files = loader["checkpoint"][1]["options"]
    assert {LATTE, "dit-tiny-skip.safetensors", "hunyuan-core-tiny.safetensors"} <= set(files)  # both folders
    assert loader["weight_dtype"][1]["options"] == ["default", "fp16", "bf16", "fp32"]
    apply = info["SkipDiTApplySkipCache"]
    inputs = apply["input"]["required"]
    assert apply["output"] == ["MODEL"] and inputs["model"][0] == "MODEL"
    assert inputs["interval"][1]["default"] == 2 and inputs["interval"][1]["min"] == 1
    assert inputs["settings"][1]["options"] == ["auto", "custom"]
    assert inputs["window_unit"][1]["options"] == ["timesteps", "percent"]
    assert (inputs["start"][1]["default"], inputs["end"][1]["default"], inputs["depth"][1]["default"]) == (700.0, 50.0, 1)
    reuse = apply["input"]["optional"]["reuse"]
    assert reuse[1]["options"] == ["state", "residual"] and reuse[1]["default"] == "state"
    branches = info["SkipDiTLoadSkipBranches"]
    assert branches["input"]["required"]["model"][0] == "MODEL" and branches["output"] == ["MODEL"]
    assert SKIP_WAN_BRANCHES in branches["input"]["required"]["branches"][1]["options"]  # models/skipdit_branches/
    assert info["SkipDiTClassLabel"]["output"] == ["CONDITIONING", "CONDITIONING"]
    assert info["SkipDiTDecodeVideo"]["input"]["optional"]["vae"][0] == "VAE"
    assert info["SkipDiTDecodeVideo"]["output"] == ["IMAGE"]
    assert info["SkipDiTEmptyLatteLatent"]["output"] == ["LATENT"]
    assert info["SkipDiTLatteT2VTextEncode"]["input"]["required"]["clip"][0] == "CLIP"


def test_ksampler_same_seed_with_and_without_skip_cache(server, base_dir):
    plain, log_plain = server.run(latte_prompt("plain", video=True))
    n1, log_n1 = server.run(latte_prompt("n1", n=1))
    n2, log_n2 = server.run(latte_prompt("n2", n=2, video=True))
    for entry, log in ((plain, log_plain), (n1, log_n1), (n2, log_n2)):
        assert entry["status"]["status_str"] == "success", error_text(entry) + log[-2000:]
    a, b, c = (load_latent(base_dir, p) for p in ("plain", "n1", "n2"))
    assert a.shape == (1, 3, 4, 8, 8)
    # A pixel-space model: the sampler's last x0 is clamped to the pixel range (random weights predict far
    # outside it: see test_pixel_space_x0_clamped_as_the_pipeline_does).
    assert float(a.abs().max()) <= 1.0 and float(c.abs().max()) <= 1.0
    assert torch.equal(a, b), "n = 1 must give the uncached output bit for bit"
    assert not torch.equal(a, c)
    assert float((c - a).norm() / a.norm()) < 0.5, "n = 2 should stay close to the uncached output"
    assert not summaries(log_plain)  # no node, no effect
    (s1,) = summaries(log_n1)
    assert (s1["full"], s1["cached"], s1["run"], s1["all"]) == ("10", "0", "80", "80")
    (s2,) = summaries(log_n2)
    # 10 steps, n = 2 over the whole schedule: every other step runs 2 of the 4 block pairs (8 blocks).
    assert (s2["full"], s2["cached"], s2["steps"]) == ("5", "5", "10")
    assert int(s2["run"]) < int(s2["all"]) and (s2["run"], s2["all"]) == ("60", "80")
    assert "measured speedup" in log_n2
    import av

    for prefix in ("plain", "n2"):  # Decode Video Latent -> core CreateVideo -> SaveVideo
        (mp4,) = (base_dir / "output" / "video").glob(f"{prefix}_*.mp4")
        with av.open(str(mp4)) as f:
            assert sum(1 for _ in f.decode(video=0)) == 4


def test_dit_auto_settings_and_clear_errors(server, base_dir):
    def dit(checkpoint, prefix):
        return {
            "1": {"class_type": "SkipDiTModelLoader", "inputs": {"checkpoint": checkpoint, "weight_dtype": "default"}},
            "2": {"class_type": "SkipDiTClassLabel", "inputs": {"class_label": 3}},
            "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "4": {"class_type": "SkipDiTApplySkipCache", "inputs": {"model": ["1", 0], "interval": 2, "settings": "auto",
                                                                    "window_unit": "timesteps", "start": 700.0, "end": 50.0, "depth": 1}},
            "5": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "seed": 5, "steps": 8, "cfg": 3.0, "sampler_name": "euler",
                                                       "scheduler": "normal", "positive": ["2", 0], "negative": ["2", 1],
                                                       "latent_image": ["3", 0], "denoise": 1.0}},
            "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": f"latents/{prefix}"}},
        }

    entry, log = server.run(dit("dit-tiny-skip.safetensors", "dit"))
    assert entry["status"]["status_str"] == "success", error_text(entry) + log[-2000:]
    assert load_latent(base_dir, "dit").shape == (1, 4, 8, 8)
    (s,) = summaries(log)
    assert "window t 1000 -> 20, depth k=1" in log  # DiT's authors' window; k=4 capped: 4 blocks, 2k < 4
    assert int(s["cached"]) > 0
    # A vanilla model has no long skips: cached steps run blocks 0 and 3, block 3 resuming from the deep state.
    entry, log = server.run(dit("dit-tiny-vanilla.safetensors", "vanilla"))
    assert entry["status"]["status_str"] == "success", error_text(entry) + log[-2000:]
    (s,) = summaries(log)
    assert int(s["cached"]) > 0 and (s["run"], s["all"]) == (
        str(4 * int(s["full"]) + 2 * int(s["cached"])), str(4 * int(s["steps"])))
    entry, _ = server.run(dit("broken.safetensors", "broken"))
    assert entry["status"]["status_str"] == "error" and "broken.safetensors" in error_text(entry)
    entry, _ = server.run(dit("wan-core-tiny.safetensors", "wan"))  # Wan belongs to core Load Diffusion Model
    assert entry["status"]["status_str"] == "error" and "load it with ComfyUI's Load Diffusion Model" in error_text(entry)
    # A file that is not there: the prompt is refused when queued (the loader's validate_inputs).
    with pytest.raises(urllib.error.HTTPError) as refused:
        server.queue(dit("not-downloaded.pt", "missing"))
    assert refused.value.code == 400
    errors = json.loads(refused.value.read())["node_errors"]["1"]["errors"]
    assert [e["type"] for e in errors] == ["custom_validation_failed"]
    assert "'not-downloaded.pt' is not in models/skipdit" in errors[0]["details"]


def test_lora_loader_and_sampler_custom_advanced(server, base_dir):
    def prompt(strength, prefix):
        return {
            "1": {"class_type": "SkipDiTModelLoader", "inputs": {"checkpoint": LATTE, "weight_dtype": "default"}},
            "2": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": "latte-tiny-lora.safetensors",
                                                                  "strength_model": strength}},
            "3": {"class_type": "SkipDiTApplySkipCache", "inputs": {"model": ["2", 0], "interval": 2, "settings": "custom",
                                                                    "window_unit": "percent", "start": 0.0, "end": 100.0, "depth": 1}},
            "4": {"class_type": "SkipDiTClassLabel", "inputs": {"class_label": 4}},
            "5": {"class_type": "SkipDiTEmptyLatteLatent",
                  "inputs": {"width": 8, "height": 8, "length": 4, "batch_size": 1, "space": "pixels (3 ch)"}},
            "6": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "dpmpp_2m"}},
            "7": {"class_type": "BasicScheduler", "inputs": {"model": ["3", 0], "scheduler": "karras", "steps": 8, "denoise": 1.0}},
            "8": {"class_type": "CFGGuider", "inputs": {"model": ["3", 0], "positive": ["4", 0], "negative": ["4", 1], "cfg": 3.0}},
            "9": {"class_type": "RandomNoise", "inputs": {"noise_seed": 9}},
            "10": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["9", 0], "guider": ["8", 0], "sampler": ["6", 0],
                                                                     "sigmas": ["7", 0], "latent_image": ["5", 0]}},
            "11": {"class_type": "SaveLatent", "inputs": {"samples": ["10", 0], "filename_prefix": f"latents/{prefix}"}},
        }

    logs = []
    for strength, prefix in ((0.0, "lora0"), (1.0, "lora1")):
        entry, log = server.run(prompt(strength, prefix))
        assert entry["status"]["status_str"] == "success", error_text(entry) + log[-2000:]
        assert "lora key not loaded" not in log
        (s,) = summaries(log)
        assert (s["full"], s["cached"], s["steps"]) == ("4", "4", "8")
        logs.append(log)
    assert not torch.equal(load_latent(base_dir, "lora0"), load_latent(base_dir, "lora1"))  # the LoRA patched our weights


def test_interrupt_mid_run_then_a_correct_run(server, base_dir):
    steps = 400
    prompt = latte_prompt("rerun", n=2, seed=11, steps=steps)
    start = len(server.log())
    prompt_id = server.queue(prompt)
    progress = re.compile(rf"\b([1-9]\d*)/{steps} \[")
    deadline = time.time() + 60
    while not progress.search(server.log(start)):  # wait until sampling is under way
        assert time.time() < deadline, server.log(start)[-2000:]
        time.sleep(0.05)
    server.post("/interrupt", {})
    entry = server.wait(prompt_id)
    time.sleep(0.3)
    assert entry["status"]["status_str"] == "error"
    assert "execution_interrupted" in error_text(entry)
    (s,) = summaries(server.log(start))
    assert s["interrupted"] and int(s["steps"]) < steps  # the run's state was logged and dropped
    # The same prompt again: the cached Apply Skip-Cache output (same state object) runs a whole run.
    entry, log = server.run(prompt)
    assert entry["status"]["status_str"] == "success", error_text(entry)
    (s,) = summaries(log)
    assert not s["interrupted"] and (s["full"], s["cached"]) == (str(steps // 2), str(steps // 2))
    # Reference: the same run never interrupted. weight_dtype fp32 is the "default" on the CPU but a
    # different node input, so ComfyUI does not serve the KSampler from its cache.
    entry, _ = server.run(latte_prompt("reference", n=2, seed=11, steps=steps, dtype="fp32"))
    assert entry["status"]["status_str"] == "success", error_text(entry)
    assert torch.equal(load_latent(base_dir, "rerun"), load_latent(base_dir, "reference"))


# ----------------------------------------------------------------------------- in-process checks


@pytest.fixture(scope="module")
def inprocess(base_dir) -> dict:
    checks = "hunyuan,wan,skip_branches,hunyuan_layouts,latte_t2v,null_caption,threads,reload,compile,easycache,odd_sizes,t5,vae_decode,heun,pixel_clamp,v_prediction,bundled"  # "bundled" changes folders: last
    done = subprocess.run(
        [comfyui_python(), str(ROOT / "tests" / "comfyui_inprocess.py"), COMFYUI_PATH,
         str(base_dir / "custom_nodes" / PACK_NAME), str(base_dir), checks],
        capture_output=True, text=True, timeout=300, env=child_env(),
    )
    results = {}
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[len("RESULT "):])
            results[r["check"]] = r
    assert done.returncode == 0 and len(results) == len(checks.split(",")), done.stdout[-3000:] + done.stderr[-5000:]
    return results


def test_skip_cache_on_core_hunyuan_dit(inprocess):
    r = inprocess["hunyuan"]
    assert r["model_class"] == "comfy.ldm.hydit.models.HunYuanDiT"  # ComfyUI's own model, not ours
    steps, depth = r["steps"], r["depth"]
    assert r["block_calls_plain"] == r["block_calls_n1"] == steps * depth
    assert r["n1_identical"]
    # n = 2 over the whole schedule: half the steps run blocks 0 and 5 only.
    assert r["block_calls_n2"] == steps // 2 * depth + steps // 2 * 2
    assert 0 < r["n2_rel_diff"] < 0.5
    assert r["block_calls_forecast"] == r["block_calls_n2"] and r["forecast_differs"]  # forecast on core's patches
    assert r["damping_zero_is_reuse"] and r["damping_half_differs"]
    assert r["block_calls_empty"] == 2 * depth + 2 * 2 and r["empty_finite"]  # F C E F C E
    assert r["block_calls_empty_warmup"] == 3 * depth + 2 * 2 and r["empty_warmup_finite"]  # F F C E F C
    assert "1 of every 2 cached steps empty" in r["empty_log"][0] and "(2 of them empty)" in r["empty_log"][0]
    assert "forecast warm-up" in r["empty_warmup_log"][0]
    assert r["input_untouched"] and r["plain_again_identical"]  # removing the node removes the effect
    assert r["twice"] == {"interval": 2, "patched_blocks": [1, 2, 3, 4], "own_state": True, "wrappers": [1, 1]}
    (line,) = [m for m in r["log"] if m.startswith("Skip-Cache [Hunyuan-DiT (ComfyUI), n=2") and "forecast" not in m]
    assert f"{steps // 2} full + {steps // 2} cached of {steps} steps" in line
    (line,) = [m for m in r["log"] if m.startswith("Skip-Cache [Hunyuan-DiT (ComfyUI), n=2") and "forecast order 1]" in m]
    assert f"{steps // 2} full + {steps // 2} cached of {steps} steps" in line  # the log names the forecast
    # A cached step fed the deep state captured from the same input reproduces the full step exactly.
    assert r["handoff_kinds"] == [False, True] and r["handoff_exact"], r["handoff_max_abs"]


def test_skip_cache_on_core_wan(inprocess):
    """ComfyUI's own Wan through core Load Diffusion Model (no long skips): a cached step runs blocks 0 and L-1, the
    last resuming from the deep state of the last full step, or (reuse = residual) from its own block-0 output plus
    the middle's residual of the last full step."""
    r = inprocess["wan"]
    assert r["model_class"] == "comfy.ldm.wan.model.WanModel"
    steps, L = r["steps"], r["blocks"]
    assert r["block_calls_plain"] == r["block_calls_n1"] == steps * L and r["n1_identical"]
    # cached steps: 2k of L blocks, either kind of reuse
    assert r["block_calls_n2"] == r["block_calls_residual"] == steps // 2 * L + steps // 2 * 2
    assert 0 < r["n2_rel_diff"] < 0.5 and 0 < r["residual_rel_diff"] < 0.5
    # a cached call on the input of the full one reproduces it: exactly from the state, up to rounding from the residual
    assert r["handoff_state"]["kinds"] == r["handoff_residual"]["kinds"] == ["full", "cached"]
    assert r["handoff_state"]["rel_diff"] == 0.0 and r["handoff_residual"]["rel_diff"] < 1e-5, r
    assert "residual" not in r["handoff_state"]["settings"] and "middle's residual reused" in r["handoff_residual"]["settings"]
    # Two experts, two KSamplerAdvanced runs: a state and a log line each, the window in the whole schedule's
    # timesteps (the high-noise half is all above t = 700: nothing cached), nothing alive afterwards.
    assert len(r["chain_log"]) == 2 and r["chain_finite"]
    for line, (full, cached) in zip(r["chain_log"], r["chain_expected"]):
        assert line.startswith("Skip-Cache [Wan (ComfyUI), n=2, window t 700 -> 50, depth k=1]")
        assert f"{full} full + {cached} cached of 5 steps" in line, (line, r["chain_timesteps"])
    assert r["chain_expected"][0] == [5, 0] and r["chain_expected"][1][1] > 0, r["chain_timesteps"]
    assert r["alive_after"] == {}
    assert "the Wan variant VaceWanModel is not supported" in r["variant_error"]
    # the preset input replaces the other inputs with the Wan preset of that name
    assert set(r["presets"]) == {"1.5x", "2x", "3x", "4x"}
    for name, p in r["presets"].items():
        assert p["config"] and p["settings"].startswith(f"preset {name}: n="), p


def test_skip_branches_on_core_wan(inprocess):
    """Load Skip Branches puts a Skip-Wan's branches on ComfyUI's own Wan (core Load Diffusion Model): the result is
    skipdit_core's Skip-Wan; Apply Skip-Cache after it cuts the long skips (cached steps run 2k of L blocks, the last k
    fed by the first k through the skips), and refuses k > S; LoRAs and fp8 base weights keep working."""
    r = inprocess["skip_branches"]
    assert r["model_class"] == "comfy.ldm.wan.model.WanModel"
    L, S, steps = r["blocks"], r["skips"], r["steps"]
    assert (L, S) == (8, 2) and SKIP_WAN_BRANCHES in r["listed"]
    assert r["patched_blocks"] == [0, 1, 6, 7] and r["input_untouched"]
    (line,) = r["node_log"]
    assert "2 long skips on 8 blocks (blocks 0..1 feed 7..6)" in line and "% of the Skip-Wan" in line
    # core Wan + the branches = skipdit_core's Skip-Wan, fp32, the same x, t, context
    assert r["parity_rel_diff"] <= 1e-5 and r["without_branches_rel_diff"] > 1e-2, r["parity_rel_diff"]
    assert not r["outputs_left_in_options"] and not r["outputs_left_after_cut"]
    assert r["threads"]["errors"] == [] and r["threads"]["rel_diff"] <= 1e-5
    # Apply Skip-Cache on it: n = 1 identical; cached steps run 2k of the L blocks
    assert r["block_calls_plain"] == r["block_calls_n1"] == steps * L and r["n1_identical"]
    assert r["block_calls_n2"] == steps // 2 * L + steps // 2 * 2
    assert r["block_calls_k2"] == steps // 2 * L + steps // 2 * 4
    assert 0 < r["n2_rel_diff"] < 0.5 and 0 < r["k2_rel_diff"] < 0.5
    lines = [m for m in r["log"] if m.startswith("Skip-Cache [Skip-Wan (ComfyUI + skip branches), n=2")]
    assert len(lines) == 2 and all(f"{steps // 2} full + {steps // 2} cached of {steps} steps" in m for m in lines)
    assert f"{steps // 2 * L + steps // 2 * 4} of {steps * L} blocks run" in lines[1]
    # the depth is checked against the long skips (the plain base takes k = 3 of 8 blocks, the Skip-Wan k <= 2)
    assert "it has 2 long skips, so k must be in 1..2" in r["depth3_error"] and r["depth3_on_base"]
    for k in (1, 2):  # a cached call = skipdit_core's cut run; on the full call's own input, the full call exactly
        other, same = r[f"handoff_k{k}_other_input"], r[f"handoff_k{k}_same_input"]
        assert other["kinds"] == same["kinds"] == ["full", "cached"]
        assert other["full_rel_diff_to_ours"] <= 1e-5 and other["rel_diff_to_ours"] <= 1e-5, other
        assert same["rel_diff_to_full"] == 0.0
    # refused, one line each
    refusals = r["refusals"]
    assert all(m is not None and "\n" not in m for m in refusals.values()), refusals
    assert "is not ComfyUI's Wan" in refusals["not_wan"]
    assert "the Wan variant VaceWanModel is not supported" in refusals["variant"]
    assert "already has skip branches (the node is applied twice)" in refusals["twice"]
    assert "connect Load Skip Branches before Apply Skip-Cache" in refusals["after_skip_cache"]
    assert "skip-wan-10-blocks-branches.safetensors: made for a Wan of 10 blocks, but the base model has 8 blocks" in refusals["blocks"]
    assert "skip-wan-width-256-branches.safetensors: made for a Wan of width 256, but the base model has width 128" in refusals["width"]
    assert "truncated-branches.safetensors: truncated" in refusals["truncated"]
    # a LoRA on the base's block weights, after the node: applied, the branches kept
    assert r["lora_keys_not_loaded"] == [] and r["lora_changed"] > 1e-3 and r["lora_rel_diff"] <= 1e-5, r
    # fp8 base weights: the branches stay float32
    fp8 = r["fp8"]
    assert "error" not in fp8, fp8
    assert fp8["weights"] == "torch.float8_e4m3fn" and fp8["branches"] == "torch.float32" and fp8["finite"]
    assert fp8["rel_diff"] < 0.2, fp8
    # the preset input: a Skip-Wan gets the presets of a Wan with long skips
    assert r["preset_1.5x"]["config"] and r["preset_1.5x"]["settings"].startswith("preset 1.5x: n=2"), r["preset_1.5x"]
    # the residual fusion's branches (hidden + branch): the same parity, and a cached call equal to skipdit_core's
    residual = r["residual"]
    assert residual["fusion"] == "residual" and residual["differs_from_replace_rel_diff"] > 1e-2, residual
    assert residual["parity_rel_diff"] <= 1e-5 and residual["cached_rel_diff_to_ours"] <= 1e-5, residual


def test_hunyuan_layouts_load_through_one_loader(inprocess):
    r = inprocess["hunyuan_layouts"]
    assert r["classes"] == {k: "HunYuanDiT" for k in ("tencent", "diffusers", "all_in_one")}
    assert r["same_weights"] == {"diffusers": True, "all_in_one": True}


def test_latte_t2v_with_cond_and_uncond_in_separate_batches(inprocess):
    r = inprocess["latte_t2v"]
    assert r["shape"] == [1, 4, 3, 8, 8]
    assert r["n1_identical"] and 0 < r["n2_rel_diff"] < 0.5
    assert r["block_calls_n2"] < r["block_calls_n1"] == r["block_calls_plain"]
    (line,) = [m for m in r["log"] if m.startswith("Skip-Cache [Latte T2V, n=2")]
    assert "3 full + 3 cached of 6 steps (12 model calls, 2 batch compositions)" in line


def test_latents_of_any_size_and_extra_frames_sample(inprocess):
    r = inprocess["odd_sizes"]["shapes"]  # padded to the patch and cropped back, as core models do
    assert r == {"9x9": [[1, 4, 9, 9], True], "1x1": [[1, 4, 1, 1], True], "8x6": [[1, 4, 8, 6], True],
                 "latte 6 frames 9x7": [[1, 3, 6, 9, 7], True]}
    warned = [m for m in inprocess["odd_sizes"]["warnings"] if "6 frames for a Latte trained on 4" in m]
    assert len(warned) == 1  # once, not every step


def test_core_easycache_acts_on_our_models_and_is_named_beside_skip_cache(inprocess):
    r = inprocess["easycache"]
    assert r["easycache_changed_output"]
    skipped = [m for m in r["log"] if m.startswith("EasyCache - skipped")]
    assert skipped and not skipped[0].startswith("EasyCache - skipped 0/"), r["log"]
    (line,) = [m for m in r["log"] if m.startswith("Skip-Cache [Latte, n=2")]
    assert "(together with easycache: the figures below are of both)" in line


def test_skip_cache_on_a_torch_compiled_model(inprocess):
    r = inprocess["compile"]  # the same sampling as without compile, in either order of the two nodes
    assert r["compile_then_cache"] < 1e-5 and r["cache_then_compile"] < 1e-5, r


def test_loaded_models_can_be_loaded_again_for_each_device(inprocess):
    """cached_patcher_init, which 0.38's MultiGPU CFG Split needs to give every device its own copy."""
    r = inprocess["reload"]
    for name in ("latte-tiny-pixels-skip.safetensors", "hunyuan-core-tiny.safetensors"):
        assert r[name] == {"independent": True, "same_weights": True, "has_init": True}, name


@pytest.mark.parametrize("family", ["latte", "hunyuan"])
def test_two_device_threads_of_one_run_equal_the_same_calls_one_after_the_other(inprocess, family):
    """MultiGPU CFG Split's shape: cond and uncond in two threads at once, one run (our Latte; core
    Hunyuan-DiT through its block patches)."""
    r = inprocess["threads"][family]
    assert r["errors"] == [] and r["identical"], r
    assert r["tracks"] == 2 and r["calls"] == 12 and "C" in r["schedule"]


def test_latte_t2v_with_the_authors_null_caption_key_loads_with_the_same_outputs(inprocess):
    assert inprocess["null_caption"]["same_outputs"]


def test_latte_t2v_text_encode_through_a_comfyui_t5(inprocess):
    r = inprocess["t5"]  # ComfyUI's PixArt T5 tokenizer and T5 encoder code, at test size
    assert r["positive_shape"] == [1, 120, 32]  # a 400-token prompt cut to Latte's 120 tokens
    assert r["negative_shape"][1] < 120 and r["finite"] and r["n2_rel_diff"] > 0


def test_decode_video_latent_through_an_image_vae(inprocess):
    r = inprocess["vae_decode"]
    assert r["shape"] == [6, 64, 64, 3]  # 2 videos x 3 frames, 8x upscaled, IMAGE layout
    assert r["order_ok"]  # every video's frames in order


def test_heun_two_model_calls_per_step(inprocess):
    r = inprocess["heun"]
    assert r["n1_identical"] and 0 < r["n2_rel_diff"] < 0.5
    (line,) = [m for m in r["log"] if m.startswith("Skip-Cache [Latte, n=2")]
    # Heun evaluates twice per step but the last: 11 calls, 6 steps (a step is a new sigma).
    assert "3 full + 3 cached of 6 steps (11 model calls" in line


def test_pixel_space_x0_clamped_as_the_pipeline_does(inprocess):
    r = inprocess["pixel_clamp"]
    assert r["pixel_has_clamp"] and r["clamp_survives_clone"]  # Apply Skip-Cache / any clone keeps it
    assert r["spacial_downscale_ratio"] == 1  # pixel latents are full resolution (ComfyUI 0.38 reads it)
    assert r["latent_models_without_clamp"] == {"latte-t2v-tiny-skip.safetensors": True, "dit-tiny-skip.safetensors": True}
    assert r["timesteps"] == list(range(901, 0, -100))  # ComfyUI's ddim_uniform, 10 steps
    # KSampler ddim + ddim_uniform with CFG = skipdit_core's DDIM with clip_denoised (the pipeline's sampler
    # for pixel-space models), same noise and timesteps: float32 rounding apart.
    assert r["clamped_vs_pipeline"] < 1e-4, r
    assert r["comfy_clamped_max_abs"] <= 1.0
    # Without the clamp ComfyUI matches the unclipped sampler instead, and lands far off the pixel range.
    assert r["unclamped_vs_pipeline_unclamped"] < 1e-4 and r["unclamped_vs_pipeline"] > 1.0
    assert r["comfy_unclamped_max_abs"] > 2.0
    assert "EPS" in r["model_sampling"] and "V_PREDICTION" not in r["model_sampling"]


def test_v_prediction_model_samples_as_the_pipeline_does(inprocess):
    """A Latte whose config says prediction "v" becomes a V_PREDICTION model: KSampler ddim = core DDIM on v."""
    r = inprocess["v_prediction"]
    assert "V_PREDICTION" in r["model_sampling"], r["model_sampling"]
    assert r["pixel_has_clamp"] and r["clamped_vs_pipeline"] < 1e-4, r
    assert r["unclamped_vs_pipeline_unclamped"] < 1e-4, r


def test_bundled_models_are_listed_by_the_loader(inprocess):
    r = inprocess["bundled"]
    assert r["bundled_registered_after_own"], r["default_paths"]  # skipdit_core/assets/, after models/skipdit/
    assert r["bundled_dir"].endswith("skipdit_core/assets")
    assert r["real_resolved"]  # the shipped demo model resolves to skipdit_core/assets/
    # skipdit_core/assets/ swapped for a stand-in folder holding the demo model's file name:
    assert r["listed"] and r["in_node_options"] and r["resolved"] and r["loads"] == "SkipDiTModel"
    assert r["own_folder_wins"]  # a file of the same name in models/skipdit/ comes first
