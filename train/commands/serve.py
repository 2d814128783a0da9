"""``mmtune serve --model LLM_DIR --adapter-dir ADAPTERS/``: an OpenAI-compatible HTTP server that serves
the base model and every adapter on it, batching requests for different adapters together.

``/v1/completions``, ``/v1/chat/completions`` (``"stream": true`` for server-sent events) and
``/v1/models``; the request's ``model`` names the adapter (the base's own name serves the bare base). It
listens on 127.0.0.1 unless ``--host`` says otherwise, and any other interface needs an API key
(``MMTUNE_API_KEY`` or ``--api-key-file``), then required as ``Authorization: Bearer <key>``. Request body
size, answer and prompt length and requests in flight are bounded; overload answers 429. ``POST
/v1/adapters {"path": ...}`` adds an adapter file at run time only with ``--allow-register``, and only from
the ``--adapter-dir`` folders.
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "serve", help="serve a causal LM and its adapters over an OpenAI-compatible HTTP API",
        description="OpenAI-style /v1/completions, /v1/chat/completions and /v1/models over one base model with "
                    "many adapters (the request's 'model' names the adapter), continuous batching.")
    parser.add_argument("--model", required=True, help="causal-LM folder (transformers save_pretrained)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder or tokenizer.json (default: --model)")
    parser.add_argument("--adapter", action="append", default=[], metavar="FILE",
                        help="mmtune adapter file to serve (repeatable); its adapters keep their saved names")
    parser.add_argument("--adapter-dir", action="append", default=[], metavar="DIR",
                        help="serve every *.safetensors in DIR (repeatable); run-time registration is confined here")
    parser.add_argument("--allow-register", action="store_true",
                        help="enable POST /v1/adapters (files inside --adapter-dir only)")
    parser.add_argument("--base-name", default=None, help="'model' id of the bare base (default: model folder name)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key-file", default=None,
                        help="file holding the API key (default: the MMTUNE_API_KEY environment variable)")
    parser.add_argument("--max-batch", type=int, default=32, help="rows decoded together (default 32)")
    parser.add_argument("--max-concurrent", type=int, default=64, help="requests in flight before 429 (default 64)")
    parser.add_argument("--max-tokens", type=int, default=256, help="largest max_tokens a request may ask")
    parser.add_argument("--max-prompt-tokens", type=int, default=1024, help="longest prompt, in tokens")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)")
    parser.add_argument("--pool-slots", type=int, default=None,
                        help="serve LoRA adapters through an adapter pool of this many device slots (any number "
                             "registered, least recently used paged out)")
    parser.add_argument("--pool-budget-mib", type=float, default=None, help="... or of this much device memory")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return parser


def api_key_of(args: argparse.Namespace) -> str | None:
    import os
    from pathlib import Path

    if args.api_key_file is not None:
        return Path(args.api_key_file).read_text(encoding="utf-8").strip() or None
    return os.environ.get("MMTUNE_API_KEY") or None


def run(args: argparse.Namespace) -> int:
    import sys

    from mm.config import ConfigError
    from train.serving.app import ServeLimits
    from train.serving.server import ServeOptions, ServerHandle, build_state, check_bind

    for flag in ("max_batch", "max_concurrent", "max_tokens", "max_prompt_tokens", "max_body_bytes"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')}: expected a positive integer, got {getattr(args, flag)}")
    for flag in ("pool_slots", "pool_budget_mib"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            raise ConfigError(f"--{flag.replace('_', '-')}: expected a positive number, got {getattr(args, flag)}")
    api_key = api_key_of(args)
    check_bind(args.host, api_key)  # before the model loads: a refused start is quick
    options = ServeOptions(model=args.model, tokenizer=args.tokenizer, adapters=args.adapter,
                           adapter_dirs=args.adapter_dir, base_name=args.base_name, host=args.host, port=args.port,
                           api_key=api_key, allow_register=args.allow_register, max_batch=args.max_batch,
                           threads=args.threads, pool_slots=args.pool_slots,
                           pool_budget_bytes=None if args.pool_budget_mib is None else int(args.pool_budget_mib * 2**20))
    limits = ServeLimits(max_body_bytes=args.max_body_bytes, max_tokens=args.max_tokens,
                         max_prompt_tokens=args.max_prompt_tokens, max_concurrent=args.max_concurrent)
    state = build_state(options, limits)
    handle = ServerHandle(state, args.host, args.port)
    print(f"mmtune serve: {handle.url}  models: {', '.join([state.base_name, *state.registry.names()])}",
          file=sys.stderr, flush=True)
    handle.run()
    return 0
