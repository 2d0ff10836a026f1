"""Figure 3: the all-pairs affinity matrix computed by the warehouse from stored neighbour
lists (``--overlap sparse``, the default, or ``sql``),
against (a) an in-memory scipy.sparse computation of all pairs at once and (b) the common
per-pair approach (for each layer pair, recompute both k-NN sets from the features and
intersect them).

\b
    python -m bench.affinity                          # 30x18 and 32x42 layers, n = 2048, k = 10
    python -m bench.affinity --shapes 4x3 --n 256 --pairs 4 --repeats 1   # a quick run

(b) is timed on ``--pairs`` randomly chosen layer pairs and scaled to all pairs (its cost
is the same for every pair); everything else is timed whole.
"""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Any

import click
import numpy as np
import scipy.sparse as sp

from bench.common import bench_warehouse, median_time, paired_times, print_table, server_option


def sparse_all_pairs(sets_a: list[np.ndarray], sets_b: list[np.ndarray], n: int, k: int) -> np.ndarray:
    """M_k for all layer pairs with one sparse product: each layer's neighbour sets become
    one row of an (L x n^2) 0/1 matrix; the product counts shared (prompt, neighbour) pairs."""

    def stack(sets: list[np.ndarray]) -> sp.csr_matrix:
        rows = np.repeat(np.arange(len(sets)), n * k)
        cols = np.concatenate([(np.arange(n)[:, None] * n + s[:, :k]).ravel() for s in sets])
        return sp.csr_matrix((np.ones(len(cols), dtype=np.float32), (rows, cols)), shape=(len(sets), n * n))

    return (stack(sets_a) @ stack(sets_b).T).toarray() / (k * n)


def per_pair(fa: np.ndarray, fb: np.ndarray, k: int) -> float:
    """What alignment libraries do per layer pair: k-NN of both feature sets, then intersect."""
    from layerbase.analysis.knn.topk import exact_topk
    from layerbase.analysis.similarity.stats import mutual_knn

    return mutual_knn(exact_topk(fa, k)[0], exact_topk(fb, k)[0], k)


@click.command(help=__doc__)
@click.option("--shapes", default="30x18,32x42", show_default=True, help="comma-separated LAxLB layer counts")
@click.option("--n", type=int, default=2048, show_default=True)
@click.option("--d", type=int, default=576, show_default=True)
@click.option("-k", "k", type=int, default=10, show_default=True)
@click.option("--pairs", type=int, default=20, show_default=True, help="layer pairs timed for the per-pair approach")
@click.option(
    "--repeats", type=int, default=3, show_default=True, help="rounds of the reference and the warehouse, back to back"
)
@click.option(
    "--overlap",
    type=click.Choice(["numpy", "sql"]),
    default="numpy",
    show_default=True,
    help="the warehouse's overlap engine: one scipy.sparse product of the stored sets, or one SQL join",
)
@server_option
def main(**options: Any) -> None:
    args = SimpleNamespace(**options)

    from layerbase.analysis.knn.materialize import materialize
    from layerbase.analysis.knn.topk import exact_topk
    from layerbase.analysis.similarity.affinity import compute_affinity
    from layerbase.ingest.synthetic import clustered_vectors, store_synthetic

    n, d, k = args.n, args.d, args.k
    rows = []
    with bench_warehouse(args.server) as wh:
        for shape in args.shapes.split(","):
            la, lb = (int(x) for x in shape.lower().split("x"))
            base = clustered_vectors(n, d, seed=la * 100 + lb)
            rng = np.random.default_rng(0)
            feats = {
                side: {
                    layer: base + 0.3 * layer * rng.standard_normal(base.shape).astype(np.float32)
                    for layer in range(1, depth + 1)
                }
                for side, depth in (("A", la), ("B", lb))
            }
            names = {m: f"{m}{la}x{lb}" for m in feats}
            for m, layers in feats.items():
                store_synthetic(wh, names[m], f"d{shape}", n=n, d=d, n_layers=len(layers), layer_vectors=layers)
                materialize(wh, names[m], f"d{shape}", k_max=k, engine="blas", progress=False)
            sets = {m: [exact_topk(f, k)[0] for f in layers.values()] for m, layers in feats.items()}
            timed = paired_times(
                lambda: sparse_all_pairs(sets["A"], sets["B"], n, k),
                lambda: compute_affinity(
                    wh, names["A"], names["B"], f"d{shape}", k=k, overlap=args.overlap, recompute=True, progress=False
                ),
                args.repeats,
            )
            warehouse_s = timed.subject_s
            assert np.allclose(timed.reference, timed.subject.scores), "the warehouse and the reference disagree"
            pairs = random.Random(0).sample(
                [(i, j) for i in range(1, la + 1) for j in range(1, lb + 1)], min(args.pairs, la * lb)
            )
            sample_s, _ = median_time(lambda: [per_pair(feats["A"][i], feats["B"][j], k) for i, j in pairs], 1)
            per_pair_s = sample_s / len(pairs) * la * lb
            rows.append(
                {
                    "layers": f"{la}x{lb}",
                    "n": n,
                    "k": k,
                    "warehouse_s": warehouse_s,
                    "in_memory_s": timed.reference_s,
                    "warehouse/in_memory": timed.ratio,
                    "ratios": timed.spread,
                    "per_pair_s": per_pair_s,
                    "per_pair/warehouse": per_pair_s / warehouse_s,
                }
            )
            print_table(rows[-1:], list(rows[-1]))
    print(
        f"\naffinity from stored neighbour lists ({args.overlap} overlap engine) vs in-memory references "
        f"({args.repeats} rounds of both, back to back; times and ratio are medians; "
        f"per-pair scaled from {args.pairs} pairs):"
    )
    print_table(rows, list(rows[0]))


if __name__ == "__main__":
    main()
