"""``layerbase serve`` under a bounded load on loopback: latency, throughput, errors and the
server's resident memory, against the same lookups run in-process in the same run.

* Stored-prompt lookups (``GET /api/neighbors``) among n synthetic activation-like vectors
  (the layer's exact sets stored by ``layerbase knn``), from 8 and 32 concurrent clients.
  Reference: the in-process ``lb.neighbors`` of the same prompts. One client shows the
  latency of a request; more show the throughput, and their latency is mostly queueing.
* New-text lookups (``POST /api/neighbors``) with SmolLM2-135M on 64 news leads, from one
  client. Reference: the model's forward pass alone, timed in-process on the same texts.

Targets (docs/serve.md): stored-prompt p50 <= 5 ms and at most 3x in-process, >= 300
requests/s on 2 cores, no errors; new-text p50 <= the forward pass + 15 ms; resident
memory growing < 5 % over a run after warm-up.

\b
    python -m bench.serve                                  # n = 100000, 30 s per load
    python -m bench.serve --n 2000 --seconds 3 --no-text   # a quick run
"""

from __future__ import annotations

import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from types import SimpleNamespace
from typing import Any

import click

from bench.common import bench_vectors, bench_warehouse, print_table


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _load(base: str, request: Any, clients: int, seconds: float) -> dict[str, Any]:
    """``clients`` threads, each with its own keep-alive connection, sending ``request(client)``
    for ``seconds``: latencies (ms), requests and errors."""
    import httpx

    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def run(i: int) -> None:
        rng = random.Random(i)
        mine, bad = [], 0
        client = httpx.Client(base_url=base, timeout=60)
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            try:
                response = request(client, rng)
                bad += response.status_code != 200
            except httpx.HTTPError:  # a reset connection is an error of the run, not of this client
                bad += 1
                client.close()
                client = httpx.Client(base_url=base, timeout=60)
            mine.append((time.perf_counter() - t0) * 1000)
        client.close()
        with lock:
            latencies.extend(mine)
            errors[0] += bad

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "requests": len(latencies),
        "errors": errors[0],
        "p50_ms": round(latencies[len(latencies) // 2], 2),
        "p99_ms": round(latencies[int(len(latencies) * 0.99)], 2),
        "per_s": round(len(latencies) / elapsed, 1),
    }


def _rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 1e6


@click.command(help=__doc__)
@click.option("--n", type=int, default=100_000, show_default=True)
@click.option("--d", type=int, default=576, show_default=True)
@click.option("--clients", default="1,8,32", show_default=True, help="comma-separated concurrent clients")
@click.option("--seconds", type=float, default=30, show_default=True, help="length of each load")
@click.option("--text/--no-text", default=True, help="also new-text lookups with SmolLM2-135M")
def main(**options: Any) -> None:
    args = SimpleNamespace(**options)
    from layerbase.api import Layerbase
    from layerbase.ingest.synthetic import store_synthetic

    with bench_warehouse() as wh:
        lb = Layerbase(wh, progress=False)
        store_synthetic(
            wh,
            "syn",
            "d",
            n=args.n,
            d=args.d,
            n_layers=1,
            layer_vectors={1: bench_vectors("activation-like", args.n, args.d, 5)},
        )
        lb.knn("syn", "d", k=10)
        rng = random.Random(0)
        prompts = [rng.randrange(args.n) for _ in range(200)]
        in_process = []
        for p in prompts:
            t0 = time.perf_counter()
            lb.neighbors("syn", "d", 1, prompt=p, k=10)
            in_process.append((time.perf_counter() - t0) * 1000)
        reference = statistics.median(in_process)
        texts: list[str] = []
        if args.text:
            from layerbase.ingest.demo import LEAD_PARAGRAPHS, bbc_dir
            from layerbase.ingest.sources import read_txt_dir

            news = read_txt_dir(bbc_dir(), LEAD_PARAGRAPHS, decode_errors="replace").sample(64, 0)
            lb.add_dataset("news", news.texts)
            lb.ingest("SmolLM2-135M-Instruct", "news")
            texts = [t[:400] for t in read_txt_dir(bbc_dir(), 1, decode_errors="replace").sample(40, 1).texts]

        port = _free_port()
        env = {**os.environ, "LAYERBASE_DATABASE_URL": wh.url.render_as_string(hide_password=False)}
        server = subprocess.Popen(
            [sys.executable, "-m", "layerbase", "serve", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            import httpx

            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(f"{base}/api/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the server did not start")
                time.sleep(0.3)

            def stored(client: Any, r: random.Random) -> Any:
                params = {"model": "syn", "dataset": "d", "layer": 1, "prompt": r.randrange(args.n), "k": 10}
                return client.get("/api/neighbors", params=params)

            rows = []
            levels = [int(c) for c in args.clients.split(",")]
            # Warm-up at the highest concurrency: the thread pool, pooled connections, caches.
            _load(base, stored, max(levels), min(3.0, args.seconds))
            for clients in levels:
                before = _rss_mb(server.pid)
                result = _load(base, stored, clients, args.seconds)
                after = _rss_mb(server.pid)
                rows.append(
                    {
                        "lookup": "stored prompt",
                        "clients": clients,
                        **result,
                        "in_process_p50_ms": round(reference, 2),
                        "p50/in_process": round(result["p50_ms"] / reference, 2),
                        "rss_mb": round(after),
                        "rss_growth_%": round(100 * (after - before) / before, 1),
                    }
                )
            if texts:
                forward = _forward_ms(texts)

                def new_text(client: Any, r: random.Random) -> Any:
                    body = {"model": "SmolLM2-135M-Instruct", "dataset": "news", "layer": 15, "text": r.choice(texts)}
                    return client.post("/api/neighbors", json=body)

                _load(base, new_text, 1, 5)  # warm-up: the model loads on first use
                before = _rss_mb(server.pid)
                # One client: a loaded model runs one forward pass at a time (its lock), so
                # more clients only queue; the latency against the forward pass is the figure.
                result = _load(base, new_text, 1, args.seconds)
                after = _rss_mb(server.pid)
                rows.append(
                    {
                        "lookup": "new text (SmolLM2)",
                        "clients": 1,
                        **result,
                        "in_process_p50_ms": round(forward, 2),
                        "p50/in_process": round(result["p50_ms"] / forward, 2),
                        "rss_mb": round(after),
                        "rss_growth_%": round(100 * (after - before) / before, 1),
                    }
                )
        finally:
            server.terminate()
            server.wait(timeout=30)
        print(
            f"layerbase serve on loopback, n = {args.n}, d = {args.d}, {args.seconds:g} s per load (in_process: "
            "the same lookup in this process; for new texts, the forward pass alone)"
        )
        print_table(rows, list(rows[0]))


def _forward_ms(texts: list[str]) -> float:
    """The median time of SmolLM2's forward pass over one text, in this process."""
    from layerbase.ingest.extract import ExtractionSettings, Extractor
    from layerbase.ingest.loading import open_model

    lm = open_model("SmolLM2-135M-Instruct", progress=False)
    extractor = Extractor(lm, ExtractionSettings())
    extractor(texts[:2])  # warm-up
    times = []
    for text in texts:
        t0 = time.perf_counter()
        extractor([text])
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


if __name__ == "__main__":
    main()
