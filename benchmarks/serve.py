"""`crossalign serve` under load: text -> image queries from 1, 8 and 32 concurrent clients, against the same
queries through the in-process `Searcher` (one thread), in one run.

    python benchmarks/serve.py [--workspace W] [--corpus DIR] [--queries-1 200] [--queries-8 400]
                               [--queries-32 640] [--limit 10] [--device auto] [--precision auto]
                               [--compile auto|on|off] [--no-autotune]

The workspace is used as it is when it has tables (the service only reads it); otherwise it is built first with
`crossalign run --corpus DIR --workspace W` (Flickr8k with the default encoders: about 20 minutes on 2 CPU cores).
Queries are distinct captions of the workspace's corpus (dev split first), shuffled with a fixed seed; each
phase gets its own, so no phase is helped by what an earlier one cached, and the in-process Searcher runs the
8-client phase's queries, in this process, with the service's environment (`SERVE_ENVIRONMENT`), the two taking
turns on quarters of them so that other work on the machine weighs on both alike. The server
is the console command in its own process, on a free port of 127.0.0.1, with its defaults (access log
included, written to a file); each client is a thread with its own keep-alive
HTTP connection. The service compiles its text query encoder in the background (`--compile`, as
`crossalign serve`); the run waits for that to end, and the in-process Searcher's encoder is compiled alike, so
both answer with the same code. It prints a table, then one line:

    p50_ms_1=… p95_ms_32=… qps_8=… qps_ratio_8=… failed=…

`qps_ratio_8` is the service's queries/s at 8 clients over the in-process Searcher's; `failed` counts the
requests of every phase that did not answer 200 with hits.
"""

from __future__ import annotations

import argparse
import os
import queue
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pyarrow.parquet as pq

from crossalign.serve.config import SERVE_ENVIRONMENT

REPO = Path(__file__).resolve().parents[1]
DEFAULT_WORKSPACE = Path(tempfile.gettempdir()) / "crossalign-serve-bench"
DEFAULT_CORPUS = REPO.parent / "shared" / "data" / "flickr8k"
WARMUP_QUERIES = 20
ROUNDS = 4  # the 8-client phase and the in-process Searcher take turns on quarters of their queries
CLIENTS = (1, 8, 32)


def crossalign_command() -> list[str]:
    return [str(Path(sys.executable).with_name("crossalign"))]


def ensure_workspace(workspace: Path, corpus: Path) -> None:
    """Build the workspace with `crossalign run` unless it already has tables."""
    if (workspace / "lancedb" / "images.lance").exists():
        return
    print(f"building {workspace} from {corpus} with `crossalign run` (about 20 minutes on 2 CPU cores) ...", flush=True)
    subprocess.run([*crossalign_command(), "run", "--corpus", str(corpus), "--workspace", str(workspace)], check=True)


def load_queries(workspace: Path, count: int, seed: int = 0) -> list[str]:
    """`count` distinct caption texts of the workspace's corpora, dev split first, shuffled."""
    texts: dict[str, int] = {}
    for table in sorted((workspace / "corpora").glob("*/captions.parquet")):
        rows = pq.read_table(table, columns=["text", "split"]).to_pylist()
        for row in rows:
            texts.setdefault(row["text"], 0 if row["split"] == "dev" else 1)
    ordered = sorted(texts, key=lambda text: (texts[text], text))
    dev, rest = [t for t in ordered if texts[t] == 0], [t for t in ordered if texts[t] == 1]
    random.Random(seed).shuffle(dev)
    random.Random(seed).shuffle(rest)
    queries = (dev + rest)[:count]
    if len(queries) < count:
        raise SystemExit(f"the workspace has {len(queries)} distinct captions; the run needs {count}")
    return queries


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(workspace: Path, args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [*crossalign_command(), "serve", "--workspace", str(workspace), "--port", str(port),
               "--device", args.device, "--precision", args.precision, "--compile", args.compile,
               "--autotune" if args.autotune else "--no-autotune"]
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT,
                               env={**os.environ, "LANCE_LOG": "error"})
    base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                return process, base
        except httpx.TransportError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit(f"crossalign serve did not start; its log:\n{log.read_text()[-3000:]}")


def wait_for_compile(base: str, timeout_s: float = 1800) -> dict:
    """The service's query compile status once it has ended (compiled, failed or off)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = httpx.get(f"{base}/health", timeout=30).json()["query_compile"]
        if status["state"] not in ("waiting", "compiling") or time.monotonic() > deadline:
            return status
        time.sleep(2)


@dataclass
class Tally:
    """Latencies, wall seconds and failures of some queries (several rounds add up)."""

    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0
    failed: int = 0

    def add(self, other: Tally) -> Tally:
        self.latencies += other.latencies
        self.seconds += other.seconds
        self.failed += other.failed
        return self

    def summary(self) -> dict[str, float]:
        ordered = sorted(self.latencies)
        return {"queries": len(ordered), "failed": self.failed, "p50_ms": 1000 * statistics.median(ordered),
                "p95_ms": 1000 * ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
                "qps": len(ordered) / self.seconds}


def run_clients(base: str, queries: list[str], clients: int, limit: int) -> Tally:
    """Send `queries` from `clients` threads (each takes the next query when its last one is answered)."""
    todo: queue.Queue[str] = queue.Queue()
    for text in queries:
        todo.put(text)
    tally, lock = Tally(), threading.Lock()

    def client() -> None:
        with httpx.Client(base_url=base, timeout=120) as http:
            while True:
                try:
                    text = todo.get_nowait()
                except queue.Empty:
                    return
                start = time.perf_counter()
                try:
                    response = http.get("/api/search/text", params={"q": text, "limit": limit})
                    ok = response.status_code == 200 and bool(response.json()["hits"])
                except httpx.HTTPError:
                    ok = False
                elapsed = time.perf_counter() - start
                with lock:
                    tally.latencies.append(elapsed)
                    tally.failed += not ok

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    tally.seconds = time.perf_counter() - start
    return tally


class InProcess:
    """One in-process Searcher, loaded and warmed once, running queries one after the other."""

    def __init__(self, workspace: Path, args: argparse.Namespace, warmup: list[str], compile: bool) -> None:
        from crossalign.search import Searcher

        self.searcher, self.limit = Searcher(workspace, device=args.device, precision=args.precision), args.limit
        if compile:  # as the service's (Inductor's disk cache has its kernels by now)
            self.searcher.compile_queries(args.autotune)
        for text in warmup:
            self.searcher.text_to_image(text, limit=self.limit)

    def run(self, queries: list[str]) -> Tally:
        tally = Tally()
        start = time.perf_counter()
        for text in queries:
            began = time.perf_counter()
            tally.failed += not self.searcher.text_to_image(text, limit=self.limit)
            tally.latencies.append(time.perf_counter() - began)
        tally.seconds = time.perf_counter() - start
        return tally


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", type=Path, default=DEFAULT_WORKSPACE)
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="built from when it has no tables")
    parser.add_argument("--queries-1", type=int, default=200)
    parser.add_argument("--queries-8", type=int, default=400)
    parser.add_argument("--queries-32", type=int, default=640)
    parser.add_argument("--limit", type=int, default=10)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--compile", default="auto", choices=("auto", "on", "off"),
                        help="the service's --compile (the in-process Searcher follows what the service did)")
    parser.add_argument("--autotune", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("LANCE_LOG", "error")
    for name, value in SERVE_ENVIRONMENT.items():  # the service's, for the in-process Searcher too (before torch)
        os.environ.setdefault(name, value)
    workspace = args.workspace.expanduser().resolve()
    ensure_workspace(workspace, args.corpus)
    sizes = {1: args.queries_1, 8: args.queries_8, 32: args.queries_32}
    queries = load_queries(workspace, WARMUP_QUERIES + sum(sizes.values()))
    phases, at = {}, WARMUP_QUERIES
    for clients in CLIENTS:
        phases[clients], at = queries[at:at + sizes[clients]], at + sizes[clients]
    log = Path(tempfile.mkdtemp(prefix="crossalign-serve-bench-")) / "serve.log"
    process, base = start_server(workspace, args, log)
    try:
        print("waiting for the service to compile its query encoder ...", flush=True)
        compiled = wait_for_compile(base)
        health = httpx.get(f"{base}/health").json()
        run_clients(base, queries[:WARMUP_QUERIES], 1, args.limit)
        in_process = InProcess(workspace, args, queries[:WARMUP_QUERIES], compiled["state"] == "compiled")
        tallies = {clients: Tally() for clients in CLIENTS} | {"in-process": Tally()}
        tallies[1].add(run_clients(base, phases[1], 1, args.limit))
        for part in range(ROUNDS):  # alternating, so that other work on the machine weighs on both alike
            chunk = phases[8][part::ROUNDS]
            tallies[8].add(run_clients(base, chunk, 8, args.limit))
            tallies["in-process"].add(in_process.run(chunk))
        tallies[32].add(run_clients(base, phases[32], 32, args.limit))
        results = {name: tally.summary() for name, tally in tallies.items()}
    finally:
        process.terminate()
        process.wait(timeout=30)
    print(f"\nworkspace {workspace}: mapper {health['mapper_id']}, {health['rows']['images']} images, "
          f"{health['rows']['captions']} captions; text -> image, limit {args.limit}; "
          f"{' '.join(f'{k}={os.environ[k]}' for k in SERVE_ENVIRONMENT)} in both processes; server log {log}")
    print(f"query encoder: {compiled['state']} (setting {compiled['setting']}, "
          f"{compiled['seconds']} s{', ' + compiled['error'] if compiled['error'] else ''}) in both")
    print(f"{'clients':<24}{'queries':>8}{'failed':>8}{'p50 ms':>9}{'p95 ms':>9}{'queries/s':>11}")
    for name, r in results.items():
        label = f"{name} (service)" if name != "in-process" else "in-process Searcher (1)"
        print(f"{label:<24}{r['queries']:>8}{r['failed']:>8}{r['p50_ms']:>9.1f}{r['p95_ms']:>9.1f}{r['qps']:>11.2f}")
    failed = sum(results[clients]["failed"] for clients in CLIENTS)
    print(f"p50_ms_1={results[1]['p50_ms']:.1f} p95_ms_32={results[32]['p95_ms']:.1f} qps_8={results[8]['qps']:.2f} "
          f"qps_ratio_8={results[8]['qps'] / results['in-process']['qps']:.3f} failed={failed}")


if __name__ == "__main__":
    main()
