"""A study at the paper's scale, end to end: synthetic activations with the shapes of real model
families stored, every layer's exact k-NN sets, the mutual k-NN matrix and diagonal test of
every model pair. The same pipeline runs on the same arrays in memory (numpy: blocked top-k,
one sparse product per pair, the same t-test) as the reference.

\b
    python -m bench.study                                           # 6 families, n = 2048, 15 pairs
    python -m bench.study --families 30x576,18x640,26x2304 --n 512   # smaller
    DATABASE_URL=postgresql://…/empty python -m bench.study          # another server; on a Citus
                                                                    # coordinator the tables are distributed first

Printed: each stage's time in the warehouse and in memory, their ratio, the stored size
(activations and neighbour lists, from the catalog) and the peak resident memory of this
process. The server's own memory is not in that figure.
"""

from __future__ import annotations

import itertools
import resource
import time
from types import SimpleNamespace
from typing import Any

import click
import numpy as np

from bench.common import bench_vectors, bench_warehouse, print_table

# (layers, width) of real families: SmolLM2-135M, Gemma-3-270M, Gemma-2-2B, Llama-3.2-1B,
# Llama-3.1-8B, Qwen2-7B.
FAMILIES = "30x576,18x640,26x2304,16x2048,32x4096,28x3584"
SIZES = """
SELECT coalesce(sum(pg_total_relation_size(c.oid)) FILTER (WHERE c.relname = 'activation'), 0),
       coalesce(sum(pg_total_relation_size(c.oid)) FILTER (WHERE c.relname = 'knn_neighbor'), 0)
FROM pg_class c WHERE c.relname IN ('activation', 'knn_neighbor') AND c.relkind IN ('r', 'p')
"""
CITUS_SIZES = "SELECT citus_total_relation_size('activation'), citus_total_relation_size('knn_neighbor')"


def layers_of(depth: int, width: int, n: int, seed: int) -> dict[int, np.ndarray]:
    """A family's layers: a latent structure shared by every family (each sees it through its
    own random projection), plus activation-like clusters of its own that grow with depth."""
    latent = bench_vectors("activation-like", n, 64, seed=0)
    rng = np.random.default_rng(seed)
    shared = latent @ rng.standard_normal((64, width)).astype(np.float32) / 8
    own = bench_vectors("activation-like", n, width, seed=seed + 1)
    return {
        layer: (shared * np.linalg.norm(own) / np.linalg.norm(shared) + (0.5 + layer / depth) * own).astype(np.float32)
        for layer in range(1, depth + 1)
    }


def in_memory(feats: dict[str, dict[int, np.ndarray]], k: int) -> dict[str, float]:
    """The reference: the same three stages on the arrays in RAM."""
    from bench.affinity import sparse_all_pairs
    from layerbase.analysis.knn.topk import exact_topk
    from layerbase.analysis.similarity.stats import diagonal_test

    times = {}
    started = time.perf_counter()
    sets = {m: [exact_topk(x, k)[0] for x in layers.values()] for m, layers in feats.items()}
    times["knn"] = time.perf_counter() - started
    started = time.perf_counter()
    n = len(next(iter(next(iter(feats.values())).values())))
    for a, b in itertools.combinations(feats, 2):
        diagonal_test(sparse_all_pairs(sets[a], sets[b], n, k), 15)
    times["affinity"] = time.perf_counter() - started
    return times


@click.command(help=__doc__)
@click.option("--families", default=FAMILIES, show_default=True, help="comma-separated LAYERSxWIDTH")
@click.option("--n", type=int, default=2048, show_default=True, help="prompts")
@click.option("-k", "k", type=int, default=10, show_default=True)
def main(**options: Any) -> None:
    args = SimpleNamespace(**options)

    from layerbase.analysis.knn.materialize import materialize
    from layerbase.analysis.similarity.affinity import compute_study
    from layerbase.ingest.synthetic import store_synthetic
    from layerbase.warehouse.distribute import citus_version, distribute

    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.families.split(",")]
    names = [f"m{depth}x{width}" for depth, width in shapes]
    feats = {
        name: layers_of(depth, width, args.n, seed=i) for i, (name, (depth, width)) in enumerate(zip(names, shapes))
    }
    raw = sum(x.nbytes for layers in feats.values() for x in layers.values())
    stored: dict[str, float] = {}
    with bench_warehouse() as wh:
        with wh.engine.connect() as conn:
            citus = citus_version(conn) is not None
        if citus:
            distribute(wh)
        started = time.perf_counter()
        for name, (depth, width) in zip(names, shapes):
            store_synthetic(wh, name, "study", n=args.n, d=width, n_layers=depth, layer_vectors=feats[name])
        stored["store"] = time.perf_counter() - started
        started = time.perf_counter()
        for name in names:
            materialize(wh, name, "study", k_max=args.k, engine="blas", progress=False)
        stored["knn"] = time.perf_counter() - started
        started = time.perf_counter()
        matrices = compute_study(wh, names, "study", k=args.k, progress=False)
        stored["affinity"] = time.perf_counter() - started
        import sqlalchemy as sa

        with wh.engine.connect() as conn:
            activation_bytes, knn_bytes = conn.execute(sa.text(CITUS_SIZES if citus else SIZES)).one()
    reference = in_memory(feats, args.k)
    rows = [
        {
            "stage": stage,
            "warehouse_s": stored[stage],
            "in_memory_s": reference.get(stage, float("nan")),
            "ratio": stored[stage] / reference[stage] if stage in reference else float("nan"),
        }
        for stage in ("store", "knn", "affinity")
    ]
    total = sum(stored.values())
    rows.append(
        {
            "stage": "total",
            "warehouse_s": total,
            "in_memory_s": sum(reference.values()),
            "ratio": total / sum(reference.values()),
        }
    )
    tests = [m.test for m in matrices if m.test is not None]
    print(
        f"\n{len(names)} models ({sum(d for d, _ in shapes)} layers), n = {args.n}, {len(matrices)} pairs, "
        f"{'Citus' if citus else 'one server'}; float32 activations {raw / 2**30:.2f} GiB, "
        f"stored: activations {activation_bytes / 2**30:.2f} GiB, neighbour lists {knn_bytes / 2**20:.0f} MiB; "
        f"peak memory of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB; "
        f"diagonal tests with t > 0: {sum(t.t is not None and t.t > 0 for t in tests)} of {len(tests)}"
    )
    print_table(rows, ["stage", "warehouse_s", "in_memory_s", "ratio"])


if __name__ == "__main__":
    main()
