"""llama.cpp's ``llama-server`` as a local engine: find the cached binary, give it GGUF files, run it on loopback.

``scripts/build_llama_server.sh`` builds the binary once per machine from the
llama.cpp source vendored in the pinned llama-cpp-python sdist and caches it
at ``cache_dir() / llama-server-<version> / bin / llama-server``
(``$LAB_LLAMA_SERVER`` points elsewhere). :class:`LlamaServer` starts it on
127.0.0.1 at a free port with ``--metrics`` (so ``lab.serving.client`` can read its
``llamacpp:spec_decode_*`` counters) and, given a draft, with speculation on:
``-md DRAFT --spec-type draft-simple --spec-draft-n-max K --spec-draft-p-min 0``
(p-min 0: always draft K tokens, as the lab's engine does). Without a draft it
serves the target alone: the "off" endpoint.

:func:`gguf_path` gives the GGUF file of a model preset: SmolLM2's ships as one
file (used in place); the Qwen presets' parts are assembled once into
``cache_dir() / gguf /`` and checked against the pinned sha256.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from lab.models.prepare import _copy_and_hash, _exclusive
from lab.models.presets import ModelError, ModelPreset, PresetLike, _stage, cache_dir, get_preset, package_file

LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # keep equal to scripts/build_llama_server.sh
BUILD_COMMAND = "bash scripts/build_llama_server.sh"


def server_binary() -> Path:
    """Where the llama-server binary is expected: ``$LAB_LLAMA_SERVER``, else the build script's cache path."""
    configured = os.environ.get("LAB_LLAMA_SERVER")
    if configured:
        return Path(configured).expanduser()
    return cache_dir() / f"llama-server-{LLAMA_CPP_PYTHON_VERSION}" / "bin" / "llama-server"


def find_server_binary() -> Path | None:
    """The llama-server binary when it exists and is executable, else None (build it with ``BUILD_COMMAND``)."""
    path = server_binary()
    return path if path.is_file() and os.access(path, os.X_OK) else None


def gguf_path(name: PresetLike) -> Path:
    """The GGUF file of a preset, checked against its pinned sha256 (assembled once into ``cache_dir()/gguf``).

    Raises:
        ModelError: a package is missing (the message gives the pip command) or
            the assembled file's checksum differs from the pinned one.
    """
    preset = get_preset(name)
    sources = [package_file(preset, part) for part in preset.parts]
    if len(sources) == 1:
        return sources[0]
    folder = cache_dir() / "gguf"
    target, marker = folder / preset.gguf_file, folder / f"{preset.gguf_file}.sha256"
    if target.is_file() and marker.is_file() and marker.read_text().strip() == preset.sha256:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with _exclusive(folder / f".{preset.name}.lock"):
        if target.is_file() and marker.is_file() and marker.read_text().strip() == preset.sha256:
            return target
        partial = folder / f".{preset.gguf_file}.partial"
        got = _copy_and_hash(sources, partial, preset.size_bytes, _stage(None, 0.0, 1.0))
        if got != preset.sha256:
            partial.unlink(missing_ok=True)
            raise ModelError(_checksum_message(preset, got))
        partial.replace(target)
        marker.write_text(got + "\n")
    return target


def _checksum_message(preset: ModelPreset, got: str) -> str:
    return (f"The weights of {preset.name!r} assembled from its packages do not match the pinned checksum "
            f"(expected sha256 {preset.sha256}, got {got}); reinstall them with: "
            f"{preset.pip_command.replace('install ', 'install --force-reinstall ', 1)}")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LlamaServer:
    """One llama-server process on 127.0.0.1, started by ``start()`` (or ``with``) and ended by ``stop()``.

    model: the target GGUF. draft: a draft GGUF (speculation on) or None (off).
    draft_max: tokens drafted per step (K). parallel: slots, i.e. requests
    decoded together (concurrency beyond it queues). ctx_per_slot: context
    tokens per slot. threads: CPU threads for target and draft.
    alias: the model name ``/v1/models`` lists and requests must use.
    extra_args: more command-line flags, appended.

    Raises ValueError for draft_max < 1, parallel < 1 or ctx_per_slot < 64.
    """

    def __init__(self, model: Path, draft: Path | None = None, *, draft_max: int = 4, parallel: int = 1,
                 ctx_per_slot: int = 1024, threads: int = 2, alias: str = "model",
                 extra_args: tuple[str, ...] = ()) -> None:
        if draft_max < 1 or parallel < 1 or ctx_per_slot < 64:
            raise ValueError(f"LlamaServer requires draft_max >= 1, parallel >= 1, ctx_per_slot >= 64; got "
                             f"{draft_max}, {parallel}, {ctx_per_slot}")
        self.model, self.draft, self.draft_max, self.parallel = Path(model), draft, draft_max, parallel
        self.ctx_per_slot, self.threads, self.alias, self.extra_args = ctx_per_slot, threads, alias, extra_args
        self.port = 0
        self.process: subprocess.Popen | None = None
        self.log = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log", delete=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self, binary: Path) -> list[str]:
        """The full command line (``--host 127.0.0.1``: never reachable from elsewhere)."""
        command = [str(binary), "--host", "127.0.0.1", "--port", str(self.port), "-m", str(self.model),
                   "--alias", self.alias, "--metrics", "-np", str(self.parallel),
                   "-c", str(self.ctx_per_slot * self.parallel), "-t", str(self.threads), "-tb", str(self.threads),
                   "--no-webui"]
        if self.draft is not None:
            command += ["-md", str(self.draft), "--spec-type", "draft-simple",
                        "--spec-draft-n-max", str(self.draft_max), "--spec-draft-n-min", "0",
                        "--spec-draft-p-min", "0", "-td", str(self.threads)]
        return command + list(self.extra_args)

    def start(self, timeout_s: float = 180.0) -> "LlamaServer":
        """Start the process and wait until ``/health`` answers 200 (the models are loaded).

        Raises:
            FileNotFoundError: no binary; the message says how to build it.
            RuntimeError: the process ended, or was not ready within ``timeout_s``;
                the message holds the end of its log.
        """
        binary = find_server_binary()
        if binary is None:
            raise FileNotFoundError(f"llama-server is not built (expected at {server_binary()}): run `{BUILD_COMMAND}` "
                                    "(about 20 minutes on 2 cores, once per machine)")
        self.port = free_port()
        self.process = subprocess.Popen(self.command(binary), stdout=self.log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited with code {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"llama-server was not ready within {timeout_s:g} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """End the process (terminate, then kill after 10 s); safe to call twice."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def log_tail(self, chars: int = 3000) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-chars:]

    def __enter__(self) -> "LlamaServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
