"""Putting a server together: base model + tokenizer + adapters -> generator, worker thread, FastAPI app,
uvicorn. ``ServerHandle`` runs it in a thread (tests, the load script) or in the foreground (the CLI)."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from mm.config import ConfigError


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to any interface


def check_bind(host: str, api_key: str | None) -> None:
    """Listening beyond this machine needs an API key: refused before anything loads."""
    if not is_loopback(host) and not api_key:
        raise ConfigError(f"--host {host}: listening on a non-loopback interface needs an API key "
                          "(set MMTUNE_API_KEY or pass --api-key-file)")
    if api_key is not None and len(api_key) < 16:
        raise ConfigError("API key: use at least 16 characters")


@dataclass
class ServeOptions:
    model: str  # a transformers causal-LM folder (save_pretrained)
    tokenizer: str | None = None  # default: the model folder
    adapters: list[str] = field(default_factory=list)  # adapter files served from the start
    adapter_dirs: list[str] = field(default_factory=list)  # every *.safetensors in them; runtime registration
    base_name: str | None = None  # the 'model' id of the bare base (default: the model folder's name)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    allow_register: bool = False
    max_batch: int = 32
    pool_slots: int | None = None  # serve through an mm.AdapterPool of this many device slots
    pool_budget_bytes: int | None = None  # ... or of this many bytes (the smaller bound wins)
    threads: int | None = None  # torch CPU threads (None: torch's default)


def build_state(options: ServeOptions, limits=None):
    """Load the model, tokenizer and adapters and start the generation worker (no HTTP yet)."""
    import torch

    from encoders.llm import load_llm, load_tokenizer
    from train.serving.app import ServeLimits, ServeState
    from train.serving.engine import BatchedGenerator
    from train.serving.registry import AdapterRegistry
    from train.serving.worker import GenerationWorker

    check_bind(options.host, options.api_key)
    if options.threads:
        torch.set_num_threads(options.threads)
    model = load_llm(options.model).eval()
    model.requires_grad_(False)
    tokenizer = load_tokenizer(options.tokenizer or options.model)
    registry = AdapterRegistry(model, options.adapter_dirs)
    if options.pool_slots or options.pool_budget_bytes:
        registry.pool = make_pool(model, registry.files_to_load(options.adapters), options)
    for path in options.adapters:
        if not Path(path).is_file():
            raise FileNotFoundError(2, "No such file", path)
        registry.register(path)
    registry.load_folders()
    worker = GenerationWorker(BatchedGenerator(model, max_batch=options.max_batch, pool=registry.pool), registry.lock)
    worker.start()
    base_name = options.base_name or Path(options.model).resolve().name
    return ServeState(base_name=base_name, tokenizer=tokenizer, registry=registry, worker=worker,
                      limits=limits or ServeLimits(), api_key=options.api_key, allow_register=options.allow_register)


def make_pool(model, files: list[Path], options: ServeOptions):
    """An mm.AdapterPool over the layers the start-up adapter files target, as wide as their largest rank."""
    import mm
    from mm.state import read_adapter_file

    targets: list[str] = []
    r_max = 1
    for path in files:
        for config in read_adapter_file(path)[0].values():
            if config.method != "lora":
                raise ConfigError(f"{path}: adapter method {config.method!r}; the pool serves LoRA adapters only")
            wanted = [*config.targets, *([config.target_regex] if config.target_regex else [])]
            targets += [t for t in wanted if t not in targets]
            r_max = max(r_max, config.r)
    if not targets:
        raise ConfigError("--pool-slots/--pool-budget-mib: no adapter file at start to take the pool's layers from")
    return mm.AdapterPool(model, targets=targets, r_max=r_max, slots=options.pool_slots,
                          budget_bytes=options.pool_budget_bytes)


class ServerHandle:
    """A uvicorn server over ``state`` on an already-bound socket (so port 0 picks a free port)."""

    def __init__(self, state, host: str, port: int) -> None:
        import uvicorn

        from train.serving.app import build_app

        self.state = state
        self.socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.host, self.port = host, self.socket.getsockname()[1]
        # uvicorn's own cap answers 503 past it: a backstop behind the app's 429 for connections that pile up
        config = uvicorn.Config(build_app(state), log_level="warning", access_log=False,
                                limit_concurrency=state.limits.max_concurrent * 4 + 16, timeout_keep_alive=5)
        self.server = uvicorn.Server(config)
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def run(self) -> None:
        """In the foreground until interrupted."""
        try:
            self.server.run(sockets=[self.socket])
        finally:
            self.state.worker.stop()

    def start(self, timeout: float = 30.0) -> ServerHandle:
        self.thread = threading.Thread(target=self.run, name="mmtune-serve", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=10)
        self.socket.close()
