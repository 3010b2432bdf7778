"""Writes workflows/*.json (the pack's example workflows, UI format) from the descriptions below and the
node schemas of a running ComfyUI with this pack installed (the core nodes' schemas are ComfyUI 0.33.0's, from
tests/data/object_info-0.33-core.json, whatever version runs):

    python tests/make_workflows.py [http://127.0.0.1:8188 | object_info.json]

Widget values not given take the schema's default; values and link types are checked against the
schemas (tests/comfyui_workflow.py). tests/test_comfyui_workflows.py loads the result in the real
frontend and runs the demo workflow.
"""
from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfyui_workflow import Node, build_workflow, note  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "workflows"

# The sampler of every workflow: ComfyUI's "ddim" is the Euler step on the denoised x0, deterministic,
# which is DDIM (eta 0); "ddim_uniform" steps through the training timesteps 1 + 1000/steps * i, the
# DDIM 50 grid the authors' Skip-Cache windows (in timesteps) were set on.
SAMPLER = {"sampler_name": "ddim", "scheduler": "ddim_uniform"}

# Frontend 1.49 (ComfyUI 0.33's own) resizes SaveVideo, whose `format` is a dynamic combo since 0.33, to this
# height when it loads a workflow (the video preview grows it again); 1.27 and 1.58 keep the file's size.
SAVE_VIDEO_HEIGHT = 106.0

DEMO_TEXT = """Skip-DiT demo: moving shapes (CPU, nothing to download)

Model: skip-latte-shapes.safetensors, bundled with the pack (skipdit_core/assets/, listed by Load Skip-DiT Model). A class-conditional pixel-space Skip-Latte (about 1 M parameters): 8 frames of 16x16 RGB, no VAE; each shape in its own colour (red circle, green square, blue triangle, yellow cross). Upscale Image (nearest-exact) makes the saved video 128x128 to be seen.

Class label: 0 circle, 1 square, 2 triangle, 3 cross. The negative output is the null label (classifier-free guidance).

Apply Skip-Cache: n = 2, settings auto = Latte's window t 900 -> 50, k = 1. After each run the log prints the full and cached steps and the measured speedup. Bypass the node (Ctrl+B) for the uncached model.

KSampler: ddim + ddim_uniform, 50 steps, cfg 4: the `skipdit demo` command's DDIM 50. Pixel-space models get their denoised x0 clamped to [-1, 1] by the pack, as the pipeline does.

Vanilla twin: latte-shapes-vanilla.safetensors (no long skips: bypass Apply Skip-Cache)."""

T2V_TEXT = """Latte T2V (Latte-1) with Skip-Cache, 512x512, 16 frames

Files:
- models/skipdit/Latte-skip.pt: the Skip-DiT Latte T2V checkpoint (Load Skip-DiT Model; .safetensors conversions load too)
- models/text_encoders/t5xxl_fp16.safetensors: T5 v1.1 XXL encoder (Load CLIP, type pixart; t5xxl_fp8_e4m3fn works too)
- models/vae/vae-ft-ema-560000-ema-pruned.safetensors: SD VAE ft-EMA (Latte's VAE)

Latte T2V Text Encode cuts prompts to the 120 T5 tokens Latte was trained with; the negative is the empty prompt.
Apply Skip-Cache: n = 2, auto = t 700 -> 50, k = 1 (the authors' T2V setting).
KSampler: DDIM 50 (ddim + ddim_uniform), cfg 7.5, as Latte's pipeline.
Decode Video Latent decodes the 16 frames through the image VAE one chunk at a time."""

UCF_TEXT = """Latte class-to-video (UCF101) with Skip-Cache, 256x256, 16 frames

Files:
- models/skipdit/ucf101-skip.pt: Skip-DiT Latte trained on UCF101 (101 action classes)
- models/vae/vae-ft-ema-560000-ema-pruned.safetensors: SD VAE ft-EMA

Class label: 0..100, the UCF101 class index the model was trained with. The negative output is the null label (101).
Apply Skip-Cache: n = 2, auto = t 900 -> 50, k = 1 (one (spatial, temporal) block pair at each end).
KSampler: DDIM 50 (ddim + ddim_uniform), cfg 7, as Latte's UCF101 sampling.
The other unconditional Latte checkpoints (ffs-skip.pt, skytimelapse-skip.pt, taichi-skip.pt) use the same graph; they ignore the class label."""

DIT_TEXT = """DiT-XL/2 class-to-image with Skip-Cache, 256x256

Files:
- models/skipdit/DiT-XL-2-skip.pt: Skip-DiT DiT-XL/2 (ImageNet 256)
- models/vae/vae-ft-ema-560000-ema-pruned.safetensors: SD VAE ft-EMA (DiT's default VAE; ft-MSE works too)

Class label: an ImageNet class 0..999 (207: golden retriever). The negative output is the null label (1000).
Apply Skip-Cache: n = 2, auto = t 1000 -> 20, k = 4 (the authors' DiT setting).
KSampler: DDIM 50 (ddim + ddim_uniform), cfg 4 (DiT's sample.py default).
Note: ComfyUI guides all 4 latent channels; DiT's reference sampler guides the first 3."""

HUNYUAN_TEXT = """Hunyuan-DiT text-to-image with Skip-Cache, 1024x1024

File:
- models/checkpoints/hunyuan_dit_1.2.safetensors: ComfyUI's all-in-one Hunyuan-DiT v1.2 (model, CLIP + mT5 text encoders, VAE); 1.0 / 1.1 work too.

Hunyuan-DiT has long skips of its own: Skip-Cache works on the released model as it is, through ComfyUI's own Hunyuan-DiT (Load Checkpoint). The pack's Load Skip-DiT Model also loads Tencent- or diffusers-layout weights into it (then text encoders and VAE come from the all-in-one file).
Apply Skip-Cache: n = 2, auto = t 700 -> 50, k = 1.
KSampler: DDIM 50 (ddim + ddim_uniform), cfg 6 (Hunyuan-DiT's original sampling)."""


def demo():
    nodes = [
        Node(1, "SkipDiTModelLoader", (0, 0), {"checkpoint": "skip-latte-shapes.safetensors"}),
        Node(2, "SkipDiTClassLabel", (0, 170), {"class_label": 0}, title="Class: 0 circle, 1 square, 2 triangle, 3 cross",
             size=(390.0, 100.0)),
        Node(3, "SkipDiTEmptyLatteLatent", (0, 300),
             {"width": 16, "height": 16, "length": 8, "batch_size": 1, "space": "pixels (3 ch)"}),
        Node(4, "SkipDiTApplySkipCache", (420, 0),
             {"interval": 2, "settings": "auto", "window_unit": "timesteps", "start": 900.0, "end": 50.0, "depth": 1},
             {"model": (1, 0)}),
        Node(5, "KSampler", (800, 0), {"seed": 0, "steps": 50, "cfg": 4.0, **SAMPLER, "denoise": 1.0},
             {"model": (4, 0), "positive": (2, 0), "negative": (2, 1), "latent_image": (3, 0)}),
        Node(6, "SkipDiTDecodeVideo", (1160, 0), {}, {"samples": (5, 0)}),
        Node(10, "ImageScale", (1160, 110), {"upscale_method": "nearest-exact", "width": 128, "height": 128, "crop": "disabled"},
             {"image": (6, 0)}),
        Node(7, "CreateVideo", (1160, 300), {"fps": 8.0}, {"images": (10, 0)}),
        Node(8, "SaveVideo", (1500, 0), {"filename_prefix": "skipdit/demo-moving-shapes", "format": "auto", "codec": "auto"},
             {"video": (7, 0)}, size=(320.0, SAVE_VIDEO_HEIGHT)),
    ]
    return nodes, (note(9, (420, 330), DEMO_TEXT, size=(720.0, 300.0), title="Read me"),)


def latte_t2v():
    nodes = [
        Node(1, "SkipDiTModelLoader", (0, 0), {"checkpoint": "Latte-skip.pt"}),
        Node(2, "CLIPLoader", (0, 130), {"clip_name": "t5xxl_fp16.safetensors", "type": "pixart", "device": "default"}),
        Node(3, "SkipDiTLatteT2VTextEncode", (380, 280),
             {"text": "Yellow and black tropical fish dart through the sea.", "max_tokens": 120}, {"clip": (2, 0)},
             title="Latte T2V Text Encode (positive)"),
        Node(4, "SkipDiTLatteT2VTextEncode", (380, 520), {"text": "", "max_tokens": 120}, {"clip": (2, 0)},
             title="Latte T2V Text Encode (negative: empty)"),
        Node(5, "SkipDiTEmptyLatteLatent", (0, 300),
             {"width": 512, "height": 512, "length": 16, "batch_size": 1, "space": "SD VAE latents (4 ch, 1/8 size)"}),
        Node(6, "SkipDiTApplySkipCache", (380, 0),
             {"interval": 2, "settings": "auto", "window_unit": "timesteps", "start": 700.0, "end": 50.0, "depth": 1},
             {"model": (1, 0)}),
        Node(7, "KSampler", (760, 0), {"seed": 0, "steps": 50, "cfg": 7.5, **SAMPLER, "denoise": 1.0},
             {"model": (6, 0), "positive": (3, 0), "negative": (4, 0), "latent_image": (5, 0)}),
        Node(8, "VAELoader", (760, 340), {"vae_name": "vae-ft-ema-560000-ema-pruned.safetensors"}),
        Node(9, "SkipDiTDecodeVideo", (1120, 0), {}, {"samples": (7, 0), "vae": (8, 0)}),
        Node(10, "CreateVideo", (1120, 150), {"fps": 8.0}, {"images": (9, 0)}),
        Node(11, "SaveVideo", (1460, 0), {"filename_prefix": "skipdit/latte-t2v", "format": "auto", "codec": "auto"},
             {"video": (10, 0)}, size=(420.0, SAVE_VIDEO_HEIGHT)),
    ]
    return nodes, (note(12, (760, 470), T2V_TEXT, size=(660.0, 300.0), title="Read me"),)


def latte_ucf101():
    nodes = [
        Node(1, "SkipDiTModelLoader", (0, 0), {"checkpoint": "ucf101-skip.pt"}),
        Node(2, "SkipDiTClassLabel", (0, 170), {"class_label": 0}, title="Class label (UCF101: 0..100)"),
        Node(3, "SkipDiTEmptyLatteLatent", (0, 300),
             {"width": 256, "height": 256, "length": 16, "batch_size": 1, "space": "SD VAE latents (4 ch, 1/8 size)"}),
        Node(4, "SkipDiTApplySkipCache", (380, 0),
             {"interval": 2, "settings": "auto", "window_unit": "timesteps", "start": 900.0, "end": 50.0, "depth": 1},
             {"model": (1, 0)}),
        Node(5, "KSampler", (760, 0), {"seed": 0, "steps": 50, "cfg": 7.0, **SAMPLER, "denoise": 1.0},
             {"model": (4, 0), "positive": (2, 0), "negative": (2, 1), "latent_image": (3, 0)}),
        Node(6, "VAELoader", (760, 340), {"vae_name": "vae-ft-ema-560000-ema-pruned.safetensors"}),
        Node(7, "SkipDiTDecodeVideo", (1120, 0), {}, {"samples": (5, 0), "vae": (6, 0)}),
        Node(8, "CreateVideo", (1120, 150), {"fps": 8.0}, {"images": (7, 0)}),
        Node(9, "SaveVideo", (1460, 0), {"filename_prefix": "skipdit/latte-ucf101", "format": "auto", "codec": "auto"},
             {"video": (8, 0)}, size=(340.0, SAVE_VIDEO_HEIGHT)),
    ]
    return nodes, (note(10, (380, 330), UCF_TEXT, size=(720.0, 300.0), title="Read me"),)


def dit():
    nodes = [
        Node(1, "SkipDiTModelLoader", (0, 0), {"checkpoint": "DiT-XL-2-skip.pt"}),
        Node(2, "SkipDiTClassLabel", (0, 170), {"class_label": 207}, title="Class label (ImageNet: 0..999)"),
        Node(3, "EmptyLatentImage", (0, 300), {"width": 256, "height": 256, "batch_size": 1}),
        Node(4, "SkipDiTApplySkipCache", (380, 0),
             {"interval": 2, "settings": "auto", "window_unit": "timesteps", "start": 1000.0, "end": 20.0, "depth": 4},
             {"model": (1, 0)}),
        Node(5, "KSampler", (760, 0), {"seed": 0, "steps": 50, "cfg": 4.0, **SAMPLER, "denoise": 1.0},
             {"model": (4, 0), "positive": (2, 0), "negative": (2, 1), "latent_image": (3, 0)}),
        Node(6, "VAELoader", (760, 340), {"vae_name": "vae-ft-ema-560000-ema-pruned.safetensors"}),
        Node(7, "VAEDecode", (1120, 0), {}, {"samples": (5, 0), "vae": (6, 0)}),
        Node(8, "SaveImage", (1480, 0), {"filename_prefix": "skipdit/dit"}, {"images": (7, 0)}, size=(340.0, 380.0)),
    ]
    return nodes, (note(9, (380, 330), DIT_TEXT, size=(720.0, 280.0), title="Read me"),)


def hunyuan():
    nodes = [
        Node(1, "CheckpointLoaderSimple", (0, 0), {"ckpt_name": "hunyuan_dit_1.2.safetensors"}),
        Node(2, "CLIPTextEncode", (380, 280), {"text": "a cute cat sitting on a sunny windowsill, high-definition photo"},
             {"clip": (1, 1)}, title="CLIP Text Encode (positive)"),
        Node(3, "CLIPTextEncode", (380, 520), {"text": ""}, {"clip": (1, 1)}, title="CLIP Text Encode (negative)"),
        Node(4, "EmptyLatentImage", (0, 170), {"width": 1024, "height": 1024, "batch_size": 1}),
        Node(5, "SkipDiTApplySkipCache", (380, 0),
             {"interval": 2, "settings": "auto", "window_unit": "timesteps", "start": 700.0, "end": 50.0, "depth": 1},
             {"model": (1, 0)}),
        Node(6, "KSampler", (760, 0), {"seed": 0, "steps": 50, "cfg": 6.0, **SAMPLER, "denoise": 1.0},
             {"model": (5, 0), "positive": (2, 0), "negative": (3, 0), "latent_image": (4, 0)}),
        Node(7, "VAEDecode", (1120, 0), {}, {"samples": (6, 0), "vae": (1, 2)}),
        Node(8, "SaveImage", (1480, 0), {"filename_prefix": "skipdit/hunyuan-dit"}, {"images": (7, 0)}, size=(420.0, 460.0)),
    ]
    return nodes, (note(9, (760, 380), HUNYUAN_TEXT, size=(660.0, 260.0), title="Read me"),)


WAN_TEXT = """Wan 2.1 T2V 1.3B with Skip-Cache, 832x480, 33 frames (ComfyUI's own Wan template, plus Apply Skip-Cache)

Files (the names of ComfyUI's Wan 2.1 text-to-video template, from Comfy-Org/Wan_2.1_ComfyUI_repackaged):
- models/diffusion_models/wan2.1_t2v_1.3B_fp16.safetensors (core Load Diffusion Model; the 14B files and LoRAs work too)
- models/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors (Load CLIP, type wan)
- models/vae/wan_2.1_vae.safetensors

Wan has no long skips: on cached steps Apply Skip-Cache runs the first and last block, the last resuming from the deep features of the last full step (reuse = state) or from its own features plus the change the middle blocks made (reuse = residual).
Apply Skip-Cache: preset 2x = n = 3 over the whole schedule (t 1000 -> 0), k = 1, forecast 1 damped 0.7, 1 empty step per interval with the forecast warm-up (chosen on tuning seeds of a small trained Wan and reported on held-out ones, docs/presets.md). Set preset to 1.5x for more fidelity, 3x / 4x for more speed, or off to use the inputs above it. The log line after each run gives the cached steps and the measured speedup.
KSampler: the template's uni_pc + simple, 30 steps, cfg 6; ModelSamplingSD3 shift 8."""


def wan():
    nodes = [
        Node(1, "UNETLoader", (0, 0), {"unet_name": "wan2.1_t2v_1.3B_fp16.safetensors", "weight_dtype": "default"}),
        Node(2, "CLIPLoader", (0, 150), {"clip_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "type": "wan", "device": "default"}),
        Node(3, "CLIPTextEncode", (380, 280), {"text": "a fox moving quickly in a beautiful winter scenery nature trees mountains "
                                                       "daytime tracking camera"}, {"clip": (2, 0)},
             title="CLIP Text Encode (positive)"),
        Node(4, "CLIPTextEncode", (380, 520), {"text": ""}, {"clip": (2, 0)}, title="CLIP Text Encode (negative)"),
        Node(5, "EmptyHunyuanLatentVideo", (0, 330), {"width": 832, "height": 480, "length": 33, "batch_size": 1}),
        Node(6, "ModelSamplingSD3", (380, 0), {"shift": 8.0}, {"model": (1, 0)}),
        Node(7, "SkipDiTApplySkipCache", (380, 110),
             {"interval": 2, "settings": "auto", "window_unit": "timesteps", "start": 1000.0, "end": 0.0, "depth": 1,
              "preset": "2x"},
             {"model": (6, 0)}),
        Node(8, "KSampler", (760, 0), {"seed": 0, "steps": 30, "cfg": 6.0, "sampler_name": "uni_pc", "scheduler": "simple",
                                       "denoise": 1.0},
             {"model": (7, 0), "positive": (3, 0), "negative": (4, 0), "latent_image": (5, 0)}),
        Node(9, "VAELoader", (760, 340), {"vae_name": "wan_2.1_vae.safetensors"}),
        Node(10, "VAEDecode", (1120, 0), {}, {"samples": (8, 0), "vae": (9, 0)}),
        Node(11, "CreateVideo", (1120, 150), {"fps": 16.0}, {"images": (10, 0)}),
        Node(12, "SaveVideo", (1460, 0), {"filename_prefix": "skipdit/wan2.1-t2v", "format": "auto", "codec": "auto"},
             {"video": (11, 0)}, size=(420.0, SAVE_VIDEO_HEIGHT)),
    ]
    return nodes, (note(13, (760, 470), WAN_TEXT, size=(660.0, 320.0), title="Read me"),)


SKIP_WAN_TEXT = """Skip-Wan: Wan 2.1 T2V 1.3B + skip branches, with Skip-Cache across the long skips, 832x480, 33 frames

Files:
- models/diffusion_models/wan2.1_t2v_1.3B_fp16.safetensors: the base (core Load Diffusion Model; fp8 weights and LoRAs work too)
- models/skipdit_branches/skip-wan2.1-t2v-1.3B-branches.safetensors: the Skip-Wan's skip branches alone (a few % of the model), written by `skipdit extract-branches SKIP_WAN.safetensors -o ...` from a Skip-Wan trained on this base (no released file: see docs/comfyui.md)
- models/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors (Load CLIP, type wan)
- models/vae/wan_2.1_vae.safetensors

Load Skip Branches puts the long skips on the base: block i feeds block 29 - i through Linear(LayerNorm(concat)), exactly the Skip-Wan. Connect it before Apply Skip-Cache (it refuses the other order).
Apply Skip-Cache: n = 2, auto = t 1000 -> 0, k = 1. With the branches a cached step runs the first and last k blocks, the last k fed the fresh outputs of the first k through the long skips (k at most the number of skips). Bypass Load Skip Branches for the plain Wan.
KSampler: the template's uni_pc + simple, 30 steps, cfg 6; ModelSamplingSD3 shift 8."""


def skip_wan():
    branches = Node(14, "SkipDiTLoadSkipBranches", (0, 500), {"branches": "skip-wan2.1-t2v-1.3B-branches.safetensors"},
                    {"model": (1, 0)})
    replaced = {
        6: [branches, Node(6, "ModelSamplingSD3", (380, 0), {"shift": 8.0}, {"model": (14, 0)})],
        12: [Node(12, "SaveVideo", (1460, 0), {"filename_prefix": "skipdit/skip-wan2.1-t2v", "format": "auto", "codec": "auto"},
                  {"video": (11, 0)}, size=(420.0, SAVE_VIDEO_HEIGHT))],
    }
    # wan()'s nodes in their order (links are numbered in it; the SaveVideo link last, as in the other files)
    nodes = [m for n in wan()[0] for m in replaced.get(n.id, [n])]
    return nodes, (note(13, (760, 470), SKIP_WAN_TEXT, size=(660.0, 360.0), title="Read me"),)


WORKFLOWS = {
    "skipdit-demo-moving-shapes": demo,
    "latte-t2v-skip-cache": latte_t2v,
    "latte-ucf101-class-to-video": latte_ucf101,
    "dit-class-to-image": dit,
    "hunyuan-dit-text-to-image": hunyuan,
    "wan2.1-t2v-1.3B-skip-cache": wan,
    "wan2.1-t2v-1.3B-skip-branches": skip_wan,
}


def object_info(source: str) -> dict:
    if source.startswith("http"):
        return json.load(urllib.request.urlopen(source.rstrip("/") + "/object_info", timeout=60))
    return json.loads(Path(source).read_text())


# The core nodes' schemas the files are written for (ComfyUI 0.33.0's), whichever version serves the pack's.
CORE_0_33 = ROOT / "tests" / "data" / "object_info-0.33-core.json"


def main(argv: list[str]) -> None:
    core = {k: v for k, v in json.loads(CORE_0_33.read_text()).items() if k != "_doc"}
    info = object_info(argv[0] if argv else "http://127.0.0.1:8188") | core
    OUT.mkdir(exist_ok=True)
    for name, make in WORKFLOWS.items():
        nodes, notes = make()
        workflow = build_workflow(nodes, info, notes)
        (OUT / f"{name}.json").write_text(json.dumps(workflow, indent=2, ensure_ascii=False) + "\n")
        print(f"wrote workflows/{name}.json ({len(nodes)} nodes + {len(notes)} note)")


if __name__ == "__main__":
    main(sys.argv[1:])
