#!/usr/bin/env bash
# Makes a Python environment in which a ComfyUI checkout runs on a CPU-only machine, for the pack's
# real-server tests (tests/test_comfyui_*.py). Installs packages only; touches nothing in the checkout.
#
#   bash tests/setup_comfyui.sh COMFYUI_DIR [VENV_DIR]        # VENV_DIR defaults to COMFYUI_DIR/.venv
#   SKIPDIT_BROWSER=1 bash tests/setup_comfyui.sh ...          # also Chromium, puppeteer-core, frontend 1.58.1
#
# Then:
#   COMFYUI_PATH=COMFYUI_DIR VENV_DIR/bin/python -m pytest tests/test_comfyui_integration.py \
#       tests/test_comfyui_workflows.py tests/test_comfyui_soak.py
#
# Tried on ComfyUI 0.33.0 and 0.3.64 (Python 3.11, x86_64). Why each step is as it is:
# - torch 2.13.0 is the CPU build; every later install runs under a constraints file holding it, because an
#   unpinned torch (ComfyUI's requirements, spandrel -> torchvision) would pull several GB of CUDA wheels.
# - torchvision has no CPU build on PyPI. 0.28.0 (made for torch 2.13) installs, but its compiled ops do not load
#   beside the CPU torch, and `import torchvision` then fails registering fake kernels for two ops that were
#   never defined. A .pth file defines those two op schemas before anything imports torchvision.
# - torchaudio (0.33 imports it at start-up, in comfy/ldm/lightricks/vae/audio_vae.py) exists on PyPI only as a
#   CUDA build. Installed without its compiled libraries, its loader falls back to pure Python.
set -euo pipefail

comfy=${1:?usage: setup_comfyui.sh COMFYUI_DIR [VENV_DIR]}
comfy=$(cd "$comfy" && pwd)
venv=${2:-$comfy/.venv}
here=$(cd "$(dirname "$0")" && pwd)
[ -f "$comfy/comfyui_version.py" ] || { echo "setup_comfyui.sh: $comfy/comfyui_version.py not found: not a ComfyUI checkout" >&2; exit 2; }
version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$comfy/comfyui_version.py")
echo "ComfyUI $version at $comfy; environment $venv"

python3 -m venv "$venv"
py="$venv/bin/python"
pip="$py -m pip --disable-pip-version-check -q"
constraints="$venv/torch-constraints.txt"
echo "torch==2.13.0" > "$constraints"

$pip install torch==2.13.0
# ComfyUI's requirements, less the packages that would replace the CPU torch (installed below, without deps).
grep -v -E '^(torch|torchvision|torchaudio|spandrel)([<>=~ ]|$)' "$comfy/requirements.txt" > "$venv/comfy-requirements.txt"
$pip install -c "$constraints" -r "$venv/comfy-requirements.txt" requests
$pip install -c "$constraints" --no-deps torchvision==0.28.0 spandrel
# The pack's own run-time dependencies (pyproject.toml), the pack itself being linked into custom_nodes/ by the tests.
$pip install -c "$constraints" "einops>=0.7" "safetensors>=0.4" "av>=12" numpy tqdm pytest

site=$($py -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cat > "$site/skipdit_torchvision_cpu_ops.py" <<'EOF'
"""Defines torchvision's two compiled op schemas, which its wheel cannot load beside a CPU torch, just before
torchvision is first imported, so that `import torchvision` succeeds (its pure-Python parts work; nms itself is
not available). Torch is not imported earlier: ComfyUI warns when torch is imported ahead of its own set-up.
Written by the Skip-DiT pack's tests/setup_comfyui.sh."""
import sys


class _DefineOpsBeforeTorchvision:
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            import torch

            global _library  # kept alive: a freed Library removes its definitions
            _library = torch.library.Library("torchvision", "DEF")
            _library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _library.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
        return None  # the ordinary finders import torchvision itself


sys.meta_path.insert(0, _DefineOpsBeforeTorchvision())
EOF
echo "import skipdit_torchvision_cpu_ops" > "$site/skipdit_torchvision_cpu_ops.pth"

$pip install -c "$constraints" --no-deps "torchaudio==2.11.1"
mkdir -p "$venv/torchaudio-cuda-libs"
find "$site/torchaudio/lib" -name '*.so' -exec mv {} "$venv/torchaudio-cuda-libs/" \;

$py - <<'EOF'
import torch, torchvision, torchaudio
print(f"torch {torch.__version__} (cuda {torch.version.cuda}), torchvision {torchvision.__version__}, torchaudio {torchaudio.__version__}")
assert torch.version.cuda is None, "a CUDA torch replaced the CPU build"
EOF

if [ "${SKIPDIT_BROWSER:-0}" = 1 ]; then
    # The frontend check (tests/comfyui_frontend_check.js): Debian's Chromium, puppeteer-core from npm, and the
    # 0.38-era frontend beside the version's own (SKIPDIT_FRONTEND_ROOT=$venv/frontend-1.58.1/comfyui_frontend_package/static).
    command -v chromium >/dev/null || { apt-get update -q && apt-get install -y -q chromium; }
    (cd "$here/browser" && PUPPETEER_SKIP_DOWNLOAD=1 npm ci --silent)
    $pip install --no-deps --target "$venv/frontend-1.58.1" comfyui-frontend-package==1.58.1
fi
echo "ready: COMFYUI_PATH=$comfy $py -m pytest tests/test_comfyui_integration.py tests/test_comfyui_workflows.py tests/test_comfyui_soak.py"
