"""A real ComfyUI server for the integration tests (test_comfyui_integration.py, test_comfyui_workflows.py):
`--cpu` on a free port with its own `--base-directory`, started with ComfyUI's Python (the one running
pytest, or $COMFYUI_PYTHON), plus tiny random models written with skipdit_core. Child processes get
OMP_NUM_THREADS=1: tiny models on a shared CPU are many times slower with more threads."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

import torch

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "comfyui-skipdit"
ANSI_CODE = re.compile(r"\x1b\[[0-9;]*m")


def child_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def comfyui_python() -> str:
    return os.environ.get("COMFYUI_PYTHON", sys.executable)


def write_model(path: Path, family: str, preset=None, dtype=None, seed: int = 1, **overrides) -> None:
    """A model of random weights (no zero-initialised output layers; `seed` picks them) saved with its config."""
    from helpers import randomize
    from skipdit_core import models
    from skipdit_core.loading import save_safetensors

    config = models.make_config(family, overrides, preset=preset)
    torch.manual_seed(0)
    model = randomize(models.build_model(family, config), seed=seed)
    save_safetensors(model.state_dict(), path, family, config, dtype=dtype)


def make_base_dir(base: Path, probe: bool = False) -> Path:
    """A --base-directory with this repository linked into custom_nodes/ (and, with `probe`, the
    test-only memory probe of tests/comfyui_probe)."""
    for sub in ("custom_nodes", "models/skipdit", "models/diffusion_models", "user", "input", "output"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    (base / "custom_nodes" / PACK_NAME).symlink_to(ROOT, target_is_directory=True)
    if probe:
        (base / "custom_nodes" / "skipdit-test-probe").symlink_to(ROOT / "tests" / "comfyui_probe", target_is_directory=True)
    return base


class Server:
    def __init__(self, base: Path, env: Optional[dict] = None):
        self.base = base
        self.log_path = base / "server.log"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [comfyui_python(), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(base), "--database-url", f"sqlite:///{base}/user/comfyui.db"]
        if os.environ.get("SKIPDIT_FRONTEND_ROOT"):  # another frontend, e.g. 1.58.1's static/ (ComfyUI 0.38's)
            cmd += ["--front-end-root", os.environ["SKIPDIT_FRONTEND_ROOT"]]
        self.log_file = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=COMFYUI_PATH, stdout=self.log_file, stderr=subprocess.STDOUT, env={**child_env(), **(env or {})})

    def __enter__(self) -> "Server":
        """The server, answering; stopped on leaving the block (also when start-up fails)."""
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def log(self, start: int = 0) -> str:
        """The server's output from character `start` on, without the ANSI colour codes ComfyUI 0.33 puts
        around its level tags (so that searches for a message, e.g. "Cannot import", see the plain text)."""
        return ANSI_CODE.sub("", self.log_path.read_text(errors="replace"))[start:]

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                urllib.request.urlopen(f"{self.url}/object_info/KSampler", timeout=2)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.3)
        raise TimeoutError(f"ComfyUI did not answer in {timeout} s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log_file.close()

    def get(self, path: str):
        return json.load(urllib.request.urlopen(self.url + path, timeout=60))

    def get_bytes(self, path: str) -> bytes:
        return urllib.request.urlopen(self.url + path, timeout=60).read()

    def post(self, path: str, data):
        req = urllib.request.Request(self.url + path, json.dumps(data).encode(), {"Content-Type": "application/json"})
        body = urllib.request.urlopen(req, timeout=30).read()
        return json.loads(body) if body else None

    def queue(self, prompt: dict) -> str:
        return self.post("/prompt", {"prompt": prompt, "client_id": "pytest"})["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 120.0) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("status_str") in ("success", "error"):
                return entry
            time.sleep(0.1)
        raise TimeoutError(f"prompt {prompt_id} did not finish:\n{self.log()[-3000:]}")

    def run(self, prompt: dict, timeout: float = 120.0) -> tuple[dict, str]:
        """Queue, wait; (history entry, the log written meanwhile)."""
        start = len(self.log())
        entry = self.wait(self.queue(prompt), timeout)
        time.sleep(0.2)  # the log line of a run's end is written right after the node finishes
        return entry, self.log(start)


def error_text(entry: dict) -> str:
    return json.dumps(entry.get("status", {}).get("messages", []))
