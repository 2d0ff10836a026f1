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
indexed engines run whole. Each of ``--repeats`` rounds times the reference and then the
engine, back to back; the ratio is the median of the rounds' ratios, and ``ratios`` shows
their range.
"""

from __future__ import annotations

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
    paired_times,
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
@click.option(
    "--repeats", type=int, default=3, show_default=True, help="rounds of the reference and each engine, back to back"
)
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

            def reference() -> np.ndarray:
                return exact_topk(vectors, args.k)[0]

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

                    timed = paired_times(reference, run, args.repeats)
                    result = timed.subject[0]
                    strategy = result.strategy
                    found = result.search or {}
                    search = describe_search(found)
                    with wh.engine.connect() as conn:
                        run_id = conn.execute(
                            sa.text("SELECT id FROM knn_run WHERE model_id = :m AND dataset_id = :d AND engine = :e"),
                            {"m": model_id, "d": dataset_id, "e": engine},
                        ).scalar()
                        stored = neighbor_array(conn, run_id, args.k)
                    recall = recall_at(stored, timed.reference, args.k)
                else:
                    sample = min(args.sample, n)
                    prompt_ids = dataset_prompt_ids(wh, dataset_id)

                    def run() -> object:  # the engine's own statement and workers, on the first prompts
                        return neighbors_in_db(
                            wh,
                            model_id,
                            1,
                            dataset_id,
                            d,
                            prompt_ids,
                            np.arange(sample),
                            args.k,
                            workers=workers,
                            storage=STORAGES[args.storage],
                        )[0]

                    timed = paired_times(reference, run, args.repeats, subject_scale=n / sample)
                    strategy = f"exact scan, timed on {sample} prompts and scaled"
                    recall = recall_at(timed.subject, timed.reference[:sample], args.k)
                rows.append(
                    {
                        "n": n,
                        "d": d,
                        "engine": engine,
                        "strategy": strategy,
                        "search": search,
                        "workers": workers,
                        "reference_s": timed.reference_s,
                        "engine_s": timed.subject_s,
                        "ratio": timed.ratio,
                        "ratios": timed.spread,
                        f"recall@{args.k}": recall,
                    }
                )
                print_table(rows[-1:], list(rows[-1]))
    print(
        f"\nin-database k-NN vs in-memory numpy ({args.repeats} rounds of the reference and each engine; times and "
        f"ratio are medians; {args.data} data, {args.server} server, {args.storage} storage):"
    )
    print_table(rows, list(rows[0]))


if __name__ == "__main__":
    main()
