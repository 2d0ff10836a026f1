"""Figure 1: the ``blas`` k-NN engine end to end (COPY out of Postgres, blocked top-k,
COPY of the neighbour lists back) against an in-memory numpy reference that computes the
same sets from arrays already in RAM.

\b
    python -m bench.knn_blas                      # n in {2048, 10000}, d in {576, 2048, 4096}
    python -m bench.knn_blas --sizes 512x64 --repeats 1    # a quick run
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import click
import sqlalchemy as sa

from bench.common import as_stored, bench_warehouse, paired_times, print_table, server_option, storage_option


@click.command(help=__doc__)
@click.option(
    "--sizes",
    default="2048x576,2048x2048,2048x4096,10000x576,10000x2048,10000x4096",
    show_default=True,
    help="comma-separated NxD shapes",
)
@click.option("--k-max", type=int, default=100, show_default=True)
@click.option(
    "--repeats", type=int, default=3, show_default=True, help="rounds of the reference and the engine, back to back"
)
@server_option
@storage_option
def main(**options: Any) -> None:
    args = SimpleNamespace(**options)

    from layerbase.analysis.knn.materialize import materialize, neighbor_array
    from layerbase.analysis.knn.topk import exact_topk
    from layerbase.ingest.synthetic import clustered_vectors, store_synthetic

    rows = []
    with bench_warehouse(args.server) as wh:
        for shape in args.sizes.split(","):
            n, d = (int(x) for x in shape.lower().split("x"))
            vectors = as_stored(clustered_vectors(n, d, seed=n + d), args.storage)
            name = f"syn-{n}x{d}"
            store_synthetic(wh, name, f"d{n}", n=n, d=d, n_layers=1, layer_vectors={1: vectors}, storage=args.storage)
            timed = paired_times(
                lambda: exact_topk(vectors, args.k_max)[0],
                lambda: materialize(wh, name, f"d{n}", k_max=args.k_max, engine="blas", force=True, progress=False),
                args.repeats,
            )
            with wh.engine.connect() as conn:
                run = conn.execute(
                    sa.text(
                        "SELECT r.id FROM knn_run r JOIN model m ON m.id = r.model_id "
                        "WHERE m.name = :m AND r.engine = 'blas'"
                    ),
                    {"m": name},
                ).scalar()
                stored = neighbor_array(conn, run, args.k_max)
            assert (stored == timed.reference).all(), "the stored sets differ from the reference"
            rows.append(
                {
                    "n": n,
                    "d": d,
                    "k_max": args.k_max,
                    "reference_s": timed.reference_s,
                    "end_to_end_s": timed.subject_s,
                    "ratio": timed.ratio,
                    "ratios": timed.spread,
                }
            )
            print_table(rows[-1:], list(rows[-1]))
    print(
        f"\nblas engine end to end vs in-memory numpy ({args.repeats} rounds of both, back to back; times and ratio "
        "are medians):"
    )
    print_table(rows, list(rows[0]))


if __name__ == "__main__":
    main()
