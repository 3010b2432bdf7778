"""Repository layout guarantees: the core never imports ComfyUI, and a ComfyUI entry point at the
repository root does not break pytest."""
from __future__ import annotations

import ast
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_core_never_imports_comfyui():
    for path in (ROOT / "skipdit_core").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names.append(node.module)
            bad = [n for n in names if n.split(".")[0] in {"comfy", "comfy_api", "comfy_extras", "nodes", "folder_paths"}]
            assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_root_entry_point_is_not_imported_by_pytest(tmp_path):
    repo = tmp_path / "pack"
    (repo / "tests").mkdir(parents=True)
    shutil.copy(ROOT / "pyproject.toml", repo)
    shutil.copy(ROOT / "tests" / "pytest_rootdir.py", repo / "tests")
    (repo / "__init__.py").write_text("import comfy_api.latest  # only importable inside ComfyUI\n")
    (repo / "tests" / "test_one.py").write_text("def test_one():\n    assert 1 + 1 == 2\n")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q"], cwd=repo, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout
