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


def test_registry_metadata_is_complete():
    """pyproject.toml as the Comfy registry reads it ([tool.comfy]; comfy_config/types.py of ComfyUI): a
    publisher, a display name, an icon that is a square PNG of at most 400 px shipped in the repository, the
    ComfyUI versions the real-server tests cover."""
    import struct
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    comfy, project = meta["tool"]["comfy"], meta["project"]
    assert comfy["PublisherId"] and comfy["DisplayName"]
    assert project["urls"]["Repository"] and project["version"].count(".") == 2
    prefix = project["urls"]["Repository"].replace("https://github.com/", "https://raw.githubusercontent.com/") + "/main/"
    assert comfy["Icon"].startswith(prefix), comfy["Icon"]
    icon = ROOT / comfy["Icon"][len(prefix):]
    head = icon.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{icon} is not a PNG"
    width, height = struct.unpack(">II", head[16:24])
    assert width == height <= 400, (width, height)
    assert comfy["requires-comfyui"] == ">=0.3.64"
    for path in comfy.get("includes", []):
        assert (ROOT / path).exists(), path


def test_nothing_published_is_compiled_or_a_link():
    """What the registry packs is what git tracks: no byte code, no __pycache__, no symlink."""
    listed = subprocess.run(["git", "ls-files", "-s"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        import pytest

        pytest.skip("not a git checkout")
    for line in listed.stdout.splitlines():
        mode, _, _, path = line.split(maxsplit=3)
        assert mode != "120000", f"{path} is a symlink"
        assert not path.endswith((".pyc", ".pyo")) and "__pycache__" not in path, path
