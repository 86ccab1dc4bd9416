"""The real ComfyUI, two ways: as a library in this process (``COMFYUI_PATH``; ``make setup`` fetches
0.30.0), with this repository loaded into it as a package the way ComfyUI loads a custom node; and as
a server (``ComfyUIServer``, any checkout: the tests run every one in ``COMFYUI_RELEASES``) that runs
API-format prompts."""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import json
import os
import re
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
PACK = "datencoder_pack"


def comfyui_path() -> Path:
    """``$COMFYUI_PATH``, checked to be a ComfyUI checkout."""
    return checked_comfyui(Path(os.environ.get("COMFYUI_PATH", "")), "COMFYUI_PATH=")


def checked_comfyui(path: Path, named: str = "") -> Path:
    """``path`` if it is a ComfyUI checkout (has ``main.py``); ``named`` says where it came from."""
    if not (path / "main.py").is_file():
        raise FileNotFoundError(f"{named}{str(path)!r} has no main.py: run through 'make' (which fetches "
                                f"ComfyUI 0.30.0 and 0.3.75) or point COMFYUI_PATH at a ComfyUI checkout")
    return path


def comfyui_releases() -> list[Path]:
    """The ComfyUI checkouts that the server tests run on: ``$COMFYUI_RELEASES``, paths separated by
    ``:`` (``make test`` gives 0.30.0 and 0.3.75), else ``$COMFYUI_PATH`` alone."""
    listed = os.environ.get("COMFYUI_RELEASES", "")
    if not listed:
        return [comfyui_path()]
    return [checked_comfyui(Path(path), "COMFYUI_RELEASES entry ") for path in listed.split(":") if path]


def comfyui_version(path: Path) -> str:
    """The release of the ComfyUI checkout ``path``: ``__version__`` in its ``comfyui_version.py``."""
    text = (Path(path) / "comfyui_version.py").read_text()
    match = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", text, re.MULTILINE)
    if match is None:
        raise ValueError(f"{path}/comfyui_version.py: expected a line __version__ = \"X.Y.Z\"")
    return match.group(1)


def import_comfyui() -> None:
    """Put ComfyUI first on ``sys.path`` (its ``nodes.py`` must win over our ``nodes/``), in CPU mode
    (ComfyUI's ``--cpu``)."""
    path = str(comfyui_path())
    if path not in sys.path:
        sys.path.insert(0, path)
        sys.modules.pop("nodes", None)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401


def import_pack():
    """This repository as the package ComfyUI would load from ``custom_nodes/``."""
    import_comfyui()
    if PACK not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK, REPO / "__init__.py",
                                                      submodule_search_locations=[str(REPO)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = module
        spec.loader.exec_module(module)
    return sys.modules[PACK]


def pack_module(name: str):
    """A submodule of this repository as ComfyUI loads it, e.g. ``pack_module("nodes.patching")``."""
    import_pack()
    return importlib.import_module(f"{PACK}.{name}")


def seeded_random_init(module: torch.nn.Module, seed: int) -> None:
    """ComfyUI builds models with uninitialised weights (they are meant to be loaded): norms to the
    identity, everything else N(0, 0.02), from a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if "norm" in name:
                parameter.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkflowError(RuntimeError):
    """ComfyUI refused or failed a prompt; the message is ComfyUI's own, with the failing node."""


@dataclass
class WorkflowRun:
    """What one prompt did: ComfyUI's history entry, when each node started (seconds since the prompt
    was queued, in execution order) and the progress texts nodes sent (node id, text)."""

    history: dict
    node_started: dict[str, float] = field(default_factory=dict)
    finished: float = 0.0
    progress_texts: list[tuple[str, str]] = field(default_factory=list)

    def node_seconds(self, node_id: str) -> float:
        """Wall time of one node: from its start to the next node's start (or the end)."""
        starts = sorted(self.node_started.values()) + [self.finished]
        start = self.node_started[node_id]
        return next(t for t in starts if t > start) - start


class ComfyUIServer:
    """The ``main.py`` of the ComfyUI checkout ``comfyui`` (default ``$COMFYUI_PATH``) as a subprocess on
    a free local port, with ``base_directory`` as its base (``custom_nodes/``, ``input/``, ``models/``, ...)
    and its log in ``base_directory/comfyui.log``. GPU when there is one, else ``--cpu``."""

    STARTUP_SECONDS = 180

    def __init__(self, base_directory: Path, *extra_args: str, comfyui: Path | None = None):
        self.base = Path(base_directory)
        self.extra_args = extra_args
        self.comfyui = comfyui_path() if comfyui is None else checked_comfyui(Path(comfyui))
        self.process: subprocess.Popen | None = None
        self.url = ""

    def __enter__(self) -> ComfyUIServer:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        device = [] if torch.cuda.is_available() else ["--cpu"]
        self.log_path = self.base / "comfyui.log"
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(port), "--base-directory",
                 str(self.base.resolve()), "--database-url", "sqlite:///:memory:", *device, *self.extra_args],
                cwd=self.comfyui, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.STARTUP_SECONDS
        while True:
            try:
                self.get("/system_stats")
                return self
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.__exit__(None, None, None)
                    raise RuntimeError(f"ComfyUI did not start; end of {self.log_path}:\n{self.log_tail()}") from None
                time.sleep(0.5)

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def peak_rss_bytes(self) -> int:
        """The server process's peak resident memory so far (Linux ``VmHWM``)."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024

    def run(self, prompt: dict, timeout: float = 1800, on_text=None) -> WorkflowRun:
        """Queue an API-format ``prompt`` (``POST /prompt``) and follow it on the websocket until it
        ends. ``on_text(node_id, text)`` gets each progress text as it arrives. Raises ``WorkflowError``
        when ComfyUI rejects or fails the prompt."""
        return asyncio.run(asyncio.wait_for(self._run(prompt, on_text), timeout))

    async def _run(self, prompt: dict, on_text) -> WorkflowRun:
        import aiohttp  # ComfyUI's own dependency

        client_id = uuid.uuid4().hex
        async with aiohttp.ClientSession(self.url) as session:
            async with session.ws_connect(f"/ws?clientId={client_id}") as ws:
                async with session.post("/prompt", json={"prompt": prompt, "client_id": client_id}) as response:
                    queued = await response.json()
                if response.status != 200:
                    raise WorkflowError(_describe_rejection(queued))
                prompt_id, started = queued["prompt_id"], time.monotonic()
                run = WorkflowRun(history={})
                async for message in ws:
                    now = time.monotonic() - started
                    if message.type == aiohttp.WSMsgType.BINARY:
                        event, = struct.unpack(">I", message.data[:4])
                        if event == BINARY_TEXT_EVENT:
                            length, = struct.unpack(">I", message.data[4:8])
                            node, text = message.data[8:8 + length].decode(), message.data[8 + length:].decode()
                            run.progress_texts.append((node, text))
                            if on_text is not None:
                                on_text(node, text)
                        continue
                    event = json.loads(message.data)
                    data = event.get("data", {})
                    if data.get("prompt_id") != prompt_id:
                        continue
                    if event["type"] == "executing" and data.get("node") is not None:
                        run.node_started[data["node"]] = now
                    if event["type"] in ("execution_success", "execution_error", "execution_interrupted"):
                        run.finished = now
                        break
            while not run.history:  # ComfyUI stores the history entry just after it reports the end
                async with session.get(f"/history/{prompt_id}") as response:
                    run.history = (await response.json()).get(prompt_id, {})
                await asyncio.sleep(0.05)
        status = run.history["status"]
        if status["status_str"] != "success":
            error = next((m[1] for m in status["messages"] if m[0] == "execution_error"), {})
            raise WorkflowError(f"node {error.get('node_id')} ({error.get('node_type')}) failed: "
                                f"{error.get('exception_message', status)}")
        return run


BINARY_TEXT_EVENT = 3  # ComfyUI's protocol.BinaryEventTypes.TEXT: a node's progress text


def _describe_rejection(response: dict) -> str:
    """ComfyUI's validation errors, one line per node."""
    lines = [response.get("error", {}).get("message", "prompt rejected")]
    for node, errors in response.get("node_errors", {}).items():
        for error in errors.get("errors", []):
            lines.append(f"  node {node} ({errors.get('class_type')}): {error['message']}: {error['details']}")
    return "\n".join(lines)
