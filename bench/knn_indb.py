"""Figure 2: the in-database k-NN engines against the in-memory numpy reference that
computes the same sets from arrays already in RAM, with recall@k of each against it:

* ``ivfflat`` and ``hnsw``: approximate, index build and recall tuning included (each
  widens its search until recall@10 on a 200-prompt sample reaches ``--min-recall``);
* ``sql``: the exact pgvector scan.

\b
    python -m bench.knn_indb                         # n = 10000, d in {576, 2048}, k = 10
    python -m bench.knn_indb --sizes 1000x64 --repeats 1 --sample 128   # a quick run

An exact scan in SQL costs the same for every query prompt and takes tens of minutes for
all 10000 on two cores, so the ``sql`` engine is timed on the first ``--sample`` prompts,
through the engine's own statement and workers, and scaled to n; the output says so. The
indexed engines run whole. The in-database engines run ``--db-repeats`` times (default 1),
the reference ``--repeats``.
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import click
import numpy as np
import sqlalchemy as sa

from bench.common import (
    as_stored,
    bench_vectors,
    bench_warehouse,
    data_option,
    median_time,
    print_table,
    server_option,
    storage_option,
)


def recall_at(stored: np.ndarray, reference: np.ndarray, k: int) -> float:
    """Mean share of each prompt's exact k nearest found in the stored k nearest."""
    hits = [len(np.intersect1d(a[:k], b[:k])) for a, b in zip(stored, reference)]
    return float(np.mean(hits)) / k


@click.command(help=__doc__)
@click.option("--sizes", default="10000x576,10000x2048", show_default=True, help="comma-separated NxD shapes")
@click.option("-k", "k", type=int, default=10, show_default=True)
@click.option("--engines", default="ivfflat,hnsw,sql", show_default=True)
@click.option("--min-recall", type=float, default=0.99, show_default=True)
@click.option("--workers", type=int, help="connections per in-database engine (default: the engine's)")
@click.option("--repeats", type=int, default=3, show_default=True, help="runs of the reference")
@click.option("--db-repeats", type=int, default=1, show_default=True, help="runs of each in-database engine")
@click.option("--sample", type=int, default=640, show_default=True, help="query prompts timed for the exact scan")
@click.option("--hnsw-m", type=int, help="hnsw: the index's m (default: pgvector's 16)")
@click.option("--ef-construction", type=int, help="hnsw: the index's ef_construction (default: 64)")
@click.option("--lists", type=int, help="ivfflat: the index's lists (default: sqrt(n))")
@server_option
@data_option
@storage_option
def main(**options: Any) -> None:
    args = SimpleNamespace(**options)

    from layerbase.analysis.knn.in_database import dataset_prompt_ids, neighbors_in_db
    from layerbase.analysis.knn.index import METHODS, index_name
    from layerbase.analysis.knn.materialize import materialize, neighbor_array
    from layerbase.analysis.knn.search import describe_search
    from layerbase.analysis.knn.topk import exact_topk
    from layerbase.ingest.synthetic import store_synthetic
    from layerbase.warehouse.parallel import default_workers
    from layerbase.warehouse.storage import STORAGES

    workers = args.workers or default_workers()
    asked = {"hnsw": {"m": args.hnsw_m, "ef_construction": args.ef_construction}, "ivfflat": {"lists": args.lists}}
    rows = []
    with bench_warehouse(args.server) as wh:
        for shape in args.sizes.split(","):
            n, d = (int(x) for x in shape.lower().split("x"))
            vectors = as_stored(bench_vectors(args.data, n, d, seed=n + d), args.storage)
            name, dataset = f"syn-{n}x{d}", f"d{n}x{d}"
            store_synthetic(wh, name, dataset, n=n, d=d, n_layers=1, layer_vectors={1: vectors}, storage=args.storage)
            reference, (idx, _) = median_time(lambda: exact_topk(vectors, args.k), args.repeats)
            with wh.engine.begin() as conn:
                model_id, dataset_id = conn.execute(
                    sa.text("SELECT m.id, d.id FROM model m, dataset d WHERE m.name = :m AND d.name = :d"),
                    {"m": name, "d": dataset},
                ).one()
                conn.execute(sa.text("ANALYZE activation, prompt"))
            for engine in args.engines.split(","):
                search = ""
                if engine in METHODS:

                    def run() -> object:
                        with wh.engine.begin() as conn:  # the index build is part of the engine's time
                            conn.execute(
                                sa.text(f'DROP INDEX IF EXISTS "{index_name(engine, model_id, 1, dataset_id)}"')
                            )
                        return materialize(
                            wh,
                            name,
                            dataset,
                            k_max=args.k,
                            engine=engine,
                            force=True,
                            min_recall=args.min_recall,
                            workers=workers,
                            progress=False,
                            **asked.get(engine, {}),
                        )

                    seconds, results = median_time(run, args.db_repeats)
                    strategy = results[0].strategy
                    found = results[0].search or {}
                    search = describe_search(found)
                    with wh.engine.connect() as conn:
                        run_id = conn.execute(
                            sa.text("SELECT id FROM knn_run WHERE model_id = :m AND dataset_id = :d AND engine = :e"),
                            {"m": model_id, "d": dataset_id, "e": engine},
                        ).scalar()
                        stored = neighbor_array(conn, run_id, args.k)
                    recall = recall_at(stored, idx, args.k)
                else:
                    timed = min(args.sample, n)
                    prompt_ids = dataset_prompt_ids(wh, dataset_id)

                    def run() -> object:  # the engine's own statement and workers, on the first prompts
                        t0 = time.perf_counter()
                        found, _ = neighbors_in_db(
                            wh,
                            model_id,
                            1,
                            dataset_id,
                            d,
                            prompt_ids,
                            np.arange(timed),
                            args.k,
                            workers=workers,
                            storage=STORAGES[args.storage],
                        )
                        return time.perf_counter() - t0, found

                    _, (sample_s, stored) = median_time(run, args.db_repeats)
                    seconds = sample_s * n / timed
                    strategy = f"exact scan, timed on {timed} prompts and scaled"
                    recall = recall_at(stored, idx[:timed], args.k)
                rows.append(
                    {
                        "n": n,
                        "d": d,
                        "engine": engine,
                        "strategy": strategy,
                        "search": search,
                        "workers": workers,
                        "reference_s": reference,
                        "engine_s": seconds,
                        "ratio": seconds / reference,
                        f"recall@{args.k}": recall,
                    }
                )
                print_table(rows[-1:], list(rows[-1]))
    print(
        f"\nin-database k-NN vs in-memory numpy (reference: median of {args.repeats}; engines: median of "
        f"{args.db_repeats}; {args.data} data, {args.server} server, {args.storage} storage):"
    )
    print_table(rows, list(rows[0]))


if __name__ == "__main__":
    main()
