"""The similarity measures for all layer pairs: the warehouse (activations read with binary
COPY, every pair computed at once, the run stored) against (a) the same all-pairs
computation on arrays already in RAM and (b) the per-pair way of alignment libraries
(platonic-rep's ``cka``: for each layer pair, both Gram matrices and tr(K H L H) with
n x n centering matrices, three HSICs a pair).

\b
    python -m bench.measures                                  # linear_cka, 30x18 layers, n = 2048
    python -m bench.measures --measures linear_cka,unbiased_cka,rbf_cka,cknna,svcca,pwcca,procrustes,rsa
    python -m bench.measures --shape 4x3 --n 256 --pairs 2 --repeats 1      # a quick run

(b) is timed on ``--pairs`` random layer pairs and scaled to all pairs (every pair costs the
same); everything else is timed whole. No permutation null (--permutations 0), so that the
matrix alone is timed.
"""

from __future__ import annotations

import random
import time
from types import SimpleNamespace
from typing import Any

import click
import numpy as np

from bench.common import bench_vectors, bench_warehouse, data_option, paired_times, print_table, server_option


def per_pair_linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """platonic-rep's metrics.cka with the inner-product kernel and hsic_biased, in torch and
    float32 as it runs (its features are cast with .float())."""
    import torch

    a, b = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)
    k, l_ = a @ a.T, b @ b.T

    def hsic(k: torch.Tensor, l_: torch.Tensor) -> torch.Tensor:
        h = torch.eye(k.shape[0], dtype=k.dtype) - 1 / k.shape[0]
        return torch.trace(k @ h @ l_ @ h)

    return float(hsic(k, l_) / torch.sqrt(hsic(k, k) * hsic(l_, l_)))


@click.command(help=__doc__)
@click.option("--measures", default="linear_cka", show_default=True, help="comma-separated measures to time")
@click.option("--shape", default="30x18", show_default=True, help="LAxLB layer counts")
@click.option("--n", type=int, default=2048, show_default=True)
@click.option("--widths", default="576,640", show_default=True, help="the two models' widths")
@click.option("-k", "k", type=int, default=10, show_default=True)
@click.option("--pairs", type=int, default=3, show_default=True, help="layer pairs timed for the per-pair way")
@click.option(
    "--repeats", type=int, default=3, show_default=True, help="rounds of the reference and the warehouse, back to back"
)
@data_option
@server_option
def main(**options: Any) -> None:
    args = SimpleNamespace(**options)

    from layerbase.analysis.similarity.affinity import compute_affinity
    from layerbase.analysis.similarity.all_pairs import AllPairs, Side
    from layerbase.analysis.similarity.measures import MeasureOptions, parse_measures
    from layerbase.ingest.synthetic import store_synthetic

    la, lb = (int(v) for v in args.shape.lower().split("x"))
    da, db = (int(v) for v in args.widths.split(","))
    n, k = args.n, args.k
    no_null = MeasureOptions(permutations=0)
    rows = []
    with bench_warehouse(args.server) as wh:
        feats = {}
        for name, depth, width in (("A", la, da), ("B", lb, db)):
            base = bench_vectors(args.data, n, width, seed=width)
            rng = np.random.default_rng(depth)
            feats[name] = {
                layer: (base + 0.2 * layer * rng.standard_normal(base.shape)).astype(np.float32)
                for layer in range(1, depth + 1)
            }
            store_synthetic(wh, f"{name}{depth}", "bench", n=n, d=width, n_layers=depth, layer_vectors=feats[name])
        for measure in parse_measures(args.measures):

            def warehouse(m=measure) -> Any:
                a, b = f"A{la}", f"B{lb}"
                return compute_affinity(
                    wh, a, b, "bench", measure=m.name, k=k, options=no_null, recompute=True, progress=False
                )

            def in_memory(m=measure) -> np.ndarray:
                side_a, side_b = Side(list(feats["A"].values())), Side(list(feats["B"].values()))
                return AllPairs(m, no_null, k, side_a, side_b).matrix()

            warehouse()  # the k-NN sets of the k-NN measures are materialized once, outside the timing
            timed = paired_times(in_memory, warehouse, args.repeats)
            stored_s = timed.subject_s
            if measure.family != "neighbours":  # k-NN measures read the stored (float32) sets
                np.testing.assert_allclose(timed.subject.scores, timed.reference, atol=1e-6)
            row = {
                "measure": measure.name,
                "layers": f"{la}x{lb}",
                "n": n,
                "warehouse_s": stored_s,
                "in_memory_s": timed.reference_s,
                "warehouse/in_memory": timed.ratio,
                "ratios": timed.spread,
            }
            if measure.name == "linear_cka":
                pairs = random.Random(0).sample([(i, j) for i in feats["A"] for j in feats["B"]], args.pairs)
                started = time.perf_counter()
                for i, j in pairs:
                    per_pair_linear_cka(feats["A"][i], feats["B"][j])
                per_pair_s = (time.perf_counter() - started) / len(pairs) * la * lb
                row |= {"per_pair_s": per_pair_s, "per_pair/warehouse": per_pair_s / stored_s}
            rows.append(row)
            print_table(rows[-1:], list(rows[-1]))
    print(
        f"\nall layer pairs, stored vs in memory ({args.repeats} rounds of both, back to back; times and ratio are "
        f"medians); per pair from {args.pairs} pairs:"
    )
    columns = list(dict.fromkeys(c for r in rows for c in r))
    print_table([{c: r.get(c, "") for c in columns} for r in rows], columns)


if __name__ == "__main__":
    main()
