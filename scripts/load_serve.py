"""Load test of ``mmtune serve``: many concurrent HTTP clients against a server this script starts on
127.0.0.1 (a subprocess), mixed adapters, a share of bad requests, bounded in count and in time.

Reports requests served, answers by status (good and bad requests apart), latency percentiles of the
served ones and the server's resident memory over time, as a Markdown table and JSON. It exits 1 when
the server broke a promise: a good request answered other than 200/429/503, a bad one not with a 4xx,
or the server gone.

    .venv/bin/python scripts/load_serve.py --tiny 8                 # a tiny Llama + 8 LoRA adapters
    .venv/bin/python scripts/load_serve.py --model LLM_DIR --adapter-dir ADAPTERS/ --clients 64 --requests 2000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BAD_KINDS = ("unknown_adapter", "bad_json", "too_many_tokens", "prompt_too_long")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="causal-LM folder to serve")
    parser.add_argument("--adapter-dir", help="folder of adapter files to serve")
    parser.add_argument("--tiny", type=int, default=None, metavar="N",
                        help="build and serve a tiny Llama with N LoRA adapters instead of --model")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=400, help="requests in all")
    parser.add_argument("--duration", type=float, default=120.0, help="stop sending after this many seconds")
    parser.add_argument("--bad-share", type=float, default=0.2, help="share of deliberately bad requests")
    parser.add_argument("--max-tokens", type=int, default=16, help="max_tokens of good requests")
    parser.add_argument("--max-concurrent", type=int, default=16, help="the server's --max-concurrent")
    parser.add_argument("--server-limit", type=int, default=64, help="the server's --max-tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, metavar="FILE", help="write the JSON report here too")
    args = parser.parse_args(argv)
    if (args.tiny is None) == (args.model is None):
        parser.error("give --model (with --adapter-dir) or --tiny N")
    if args.clients < 1 or args.requests < 1 or args.duration <= 0 or not 0 <= args.bad_share <= 1:
        parser.error("--clients and --requests must be positive, --duration > 0, --bad-share in [0, 1]")
    return args


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(model: str, adapter_dir: str, port: int, args: argparse.Namespace, log) -> subprocess.Popen:
    command = [sys.executable, "-m", "train.cli", "serve", "--model", model, "--adapter-dir", adapter_dir,
               "--host", "127.0.0.1", "--port", str(port), "--max-concurrent", str(args.max_concurrent),
               "--max-tokens", str(args.server_limit), "--max-prompt-tokens", "64", "--threads", "1"]
    return subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=log)


def wait_ready(url: str, server: subprocess.Popen, timeout: float = 180.0) -> list[str]:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with status {server.returncode} before it was ready")
        try:
            return [m["id"] for m in httpx.get(url + "/v1/models", timeout=2).json()["data"]]
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError(f"the server did not answer within {timeout:.0f} s")


class MemorySampler:
    """The server process's resident memory (MiB) every ``period`` seconds, in a thread."""

    def __init__(self, pid: int, period: float = 0.5) -> None:
        import psutil

        self.process, self.period = psutil.Process(pid), period
        self.samples: list[tuple[float, float]] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.start_time = time.monotonic()

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                rss = self.process.memory_info().rss / 2 ** 20
            except Exception:  # the process is gone: the report says so through the liveness check
                return
            self.samples.append((time.monotonic() - self.start_time, rss))
            self.stopping.wait(self.period)

    def __enter__(self) -> MemorySampler:
        self.thread.start()
        return self

    def __exit__(self, *_) -> None:
        self.stopping.set()
        self.thread.join()


def make_request(rng: random.Random, models: list[str], args: argparse.Namespace) -> tuple[str, dict | bytes]:
    """(kind, body): 'good' or one of BAD_KINDS."""
    from train.serving.tiny import WORDS

    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
    good = {"model": rng.choice(models), "prompt": prompt, "max_tokens": rng.randint(1, args.max_tokens),
            "temperature": rng.choice([0, 0, 0.8])}
    if rng.random() >= args.bad_share:
        return "good", good
    kind = rng.choice(BAD_KINDS)
    if kind == "unknown_adapter":
        return kind, {**good, "model": f"no_such_adapter_{rng.randint(0, 999)}"}
    if kind == "bad_json":
        return kind, b'{"model": "x", "prompt": '
    if kind == "too_many_tokens":
        return kind, {**good, "max_tokens": args.server_limit + 1 + rng.randint(0, 1000)}
    return kind, {**good, "prompt": " ".join(["w1"] * 200)}


async def drive(url: str, models: list[str], args: argparse.Namespace) -> list[dict]:
    import httpx

    rng = random.Random(args.seed)
    plan = [make_request(rng, models, args) for _ in range(args.requests)]
    results: list[dict] = []
    deadline = time.monotonic() + args.duration
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)

    async def client(queue: asyncio.Queue) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
            while time.monotonic() < deadline:
                try:
                    kind, body = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                start = time.monotonic()
                try:
                    if isinstance(body, bytes):
                        reply = await http.post("/v1/completions", content=body,
                                                headers={"content-type": "application/json"})
                    else:
                        reply = await http.post("/v1/completions", json=body)
                    status = reply.status_code
                except httpx.HTTPError as err:
                    status = f"no answer ({type(err).__name__})"
                results.append({"kind": kind, "status": status, "seconds": time.monotonic() - start})

    queue: asyncio.Queue = asyncio.Queue()
    for item in plan:
        queue.put_nowait(item)
    await asyncio.gather(*(client(queue) for _ in range(args.clients)))
    return results


def percentile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def summarize(results: list[dict], memory: list[tuple[float, float]], alive: bool, planned: int) -> dict:
    good = [r for r in results if r["kind"] == "good"]
    bad = [r for r in results if r["kind"] != "good"]
    served = [r for r in good if r["status"] == 200]
    count = lambda rows: {str(s): sum(1 for r in rows if r["status"] == s)  # noqa: E731
                          for s in sorted({r["status"] for r in rows}, key=str)}
    latencies = [r["seconds"] * 1000 for r in served]
    rss = [m for _, m in memory]
    settled = rss[len(rss) // 4:] or rss  # after warm-up: imports and first batches allocate once
    return {
        "planned": planned, "sent": len(results), "served": len(served),
        "good_by_status": count(good), "bad_by_status": count(bad),
        "good_rejected_wrongly": sum(1 for r in good if r["status"] not in (200, 429, 503)),
        "bad_not_4xx": sum(1 for r in bad if not (isinstance(r["status"], int) and 400 <= r["status"] < 500)),
        "latency_ms": {f"p{int(q * 100)}": percentile(latencies, q) for q in (0.5, 0.9, 0.99)},
        "server_rss_mib": {"first": rss[0] if rss else None, "after_warmup": settled[0] if settled else None,
                           "max": max(rss) if rss else None, "last": rss[-1] if rss else None,
                           "samples": [[round(t, 1), round(m, 1)] for t, m in memory[:: max(1, len(memory) // 20)]]},
        "server_alive": alive,
    }


def markdown(report: dict) -> str:
    lat, rss = report["latency_ms"], report["server_rss_mib"]

    def ms(value):
        return "-" if value is None else f"{value:.0f}"

    def mib(value):
        return "-" if value is None else f"{value:.0f}"

    lines = ["| measure | value |", "|---|---|",
             f"| requests sent / planned | {report['sent']} / {report['planned']} |",
             f"| good requests served (200) | {report['served']} |",
             f"| good requests by status | {report['good_by_status']} |",
             f"| bad requests by status | {report['bad_by_status']} |",
             f"| good requests answered other than 200/429/503 | {report['good_rejected_wrongly']} |",
             f"| bad requests not answered 4xx | {report['bad_not_4xx']} |",
             f"| latency of served requests p50 / p90 / p99 (ms) | {ms(lat['p50'])} / {ms(lat['p90'])} / "
             f"{ms(lat['p99'])} |",
             f"| server RSS first / after warm-up / max / last (MiB) | {mib(rss['first'])} / "
             f"{mib(rss['after_warmup'])} / {mib(rss['max'])} / {mib(rss['last'])} |",
             f"| server alive at the end | {report['server_alive']} |"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from train.cli import quiet_unused_components

    quiet_unused_components()  # DeepSpeed's "Setting accelerator to CPU" on import: not used here
    with tempfile.TemporaryDirectory(prefix="mmtune-load-") as scratch:
        model, adapter_dir = args.model, args.adapter_dir
        if args.tiny is not None:
            from train.serving.tiny import make_served_world

            world = make_served_world(scratch, tuple(f"adapter_{i}" for i in range(args.tiny)))
            model, adapter_dir = str(world["model"]), str(world["adapters"])
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with open(Path(scratch) / "server.log", "w") as log:
            server = start_server(model, adapter_dir, port, args, log)
            try:
                models = wait_ready(url, server)
                with MemorySampler(server.pid) as sampler:
                    results = asyncio.run(drive(url, models, args))
                alive = server.poll() is None
                report = summarize(results, sampler.samples, alive, args.requests)
            finally:
                server.terminate()
                server.wait(timeout=30)
    print(markdown(report))
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    broken = report["good_rejected_wrongly"] or report["bad_not_4xx"] or not report["server_alive"]
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
