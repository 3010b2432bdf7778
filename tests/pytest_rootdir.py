"""pytest plugin (loaded through `-p` in pyproject.toml): collect the repository root as a plain
directory. The root's __init__.py is ComfyUI's entry point for the node pack; as a package, pytest
would import it, and with it ComfyUI, before any test ran."""
import pytest


def pytest_collect_directory(path, parent):
    if path == parent.config.rootpath:
        return pytest.Dir.from_parent(parent, path=path)
    return None
