"""Figure 5: ad-hoc ``layerbase neighbors`` latency for a stored prompt, through the CLI's
own code path (``analysis.neighbors.nearest``), at n = 100000 synthetic vectors of width
576; recall@k against exact neighbours, and an in-memory numpy lookup of the same queries
as the reference. Two paths are timed on the same queries:

* the HNSW index, which answers while the layer has no stored exact k-NN set (and always
  for a new text), built by ``layerbase knn --engine hnsw``, which also tunes the lookups'
  ef_search (``--ef-search`` overrides it);
* the stored exact k-NN set, once ``layerbase knn`` has materialized the layer (here with
  the blas engine and K_max = k; its time is printed too).

\b
    python -m bench.lookup                            # n = 100000, d = 576, 200 queries
    python -m bench.lookup --n 5000 --d 64 --queries 20   # a quick run
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import click
import numpy as np

from bench.common import (
    as_stored,
    bench_vectors,
    bench_warehouse,
    data_option,
    print_table,
    server_option,
    storage_option,
)


@click.command(help=__doc__)
@click.option("--n", type=int, default=100_000, show_default=True)
@click.option("--d", type=int, default=576, show_default=True)
@click.option("-k", "k", type=int, default=10, show_default=True)
@click.option("--queries", type=int, default=200, show_default=True)
@click.option("--ef-search", type=int, help="HNSW ef_search (default: the CLI's)")
@server_option
@data_option
@storage_option
def main(**options: Any) -> None:
    args = SimpleNamespace(**options)

    from layerbase.analysis.knn.lookup import nearest
    from layerbase.analysis.knn.materialize import materialize
    from layerbase.analysis.knn.topk import exact_topk, normalize
    from layerbase.ingest.synthetic import store_synthetic

    n, d, k = args.n, args.d, args.k
    with bench_warehouse(args.server) as wh:
        vectors = as_stored(bench_vectors(args.data, n, d, seed=5), args.storage)
        t0 = time.perf_counter()
        store_synthetic(wh, "syn", "lookup", n=n, d=d, n_layers=1, layer_vectors={1: vectors}, storage=args.storage)
        store_s = time.perf_counter() - t0
        # What a user runs first: `layerbase knn --engine hnsw` builds the layer's index,
        # stores its (approximate) sets and tunes ef_search for lookups of 10 neighbours.
        t0 = time.perf_counter()
        [hnsw] = materialize(wh, "syn", "lookup", k_max=k, engine="hnsw", progress=False)
        build_s = time.perf_counter() - t0
        lookup = hnsw.search["lookup"]
        tuned = ", ".join(f"{t['ef_search']}: {t['recall']}" for t in lookup["tried"])
        # Other prompts than the 200 (seed 0) on which `layerbase knn` tuned ef_search: held out.
        queries = np.sort(np.random.default_rng(1).choice(n, size=args.queries, replace=False))
        exact, _ = exact_topk(vectors, k, queries=queries)
        unit = normalize(vectors)
        reference = []
        for position in queries:  # one query at a time, as a user's lookup would run in RAM
            t0 = time.perf_counter()
            sims = unit @ unit[position]
            sims[position] = -np.inf
            np.argpartition(-sims, k)[:k]
            reference.append(time.perf_counter() - t0)
        ref = np.array(reference) * 1000

        def measure(extra: dict) -> dict:
            nearest(wh, "syn", 1, "lookup", position=int(queries[0]), k=k)  # warm the connection and the cache
            latencies, found, paths = [], [], set()
            for position in queries:
                t0 = time.perf_counter()
                answer = nearest(wh, "syn", 1, "lookup", position=int(position), k=k, ef_search=args.ef_search)
                latencies.append(time.perf_counter() - t0)
                found.append(answer.positions)
                paths.add(answer.path.split(" (")[0])
            lat = np.array(latencies) * 1000
            return {
                "path": "; ".join(sorted(paths)),
                "n": n,
                "d": d,
                "k": k,
                "queries": len(queries),
                "p50_ms": float(np.percentile(lat, 50)),
                "p99_ms": float(np.percentile(lat, 99)),
                f"recall@{k}": float(np.mean([len(np.intersect1d(f, e)) / k for f, e in zip(found, exact)])),
                "numpy_p50_ms": float(np.percentile(ref, 50)),
                "p50/numpy": float(np.percentile(lat, 50) / np.percentile(ref, 50)),
                **extra,
            }

        rows = [measure({"prepare_s": build_s, "prepared_by": "layerbase knn (hnsw)"})]
        print_table(rows, list(rows[0]))
        t0 = time.perf_counter()
        materialize(wh, "syn", "lookup", k_max=k, engine="blas", progress=False)
        rows.append(measure({"prepare_s": time.perf_counter() - t0, "prepared_by": "layerbase knn (blas)"}))
    print(f"\n`layerbase neighbors` code path ({args.data} data, {args.server} server; load {store_s:.1f} s):")
    print_table(rows, list(rows[0]))
    if args.ef_search is None:
        print(f"ef_search tuned for lookups on {lookup['queries']} prompts (ef_search: recall@10): {tuned}")
    print("target: p50 <= 5 ms at recall@10 >= 0.99")


if __name__ == "__main__":
    main()
