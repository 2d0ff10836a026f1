"""``layerbase geometry global`` and ``geometry local``: token-embedding geometry."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from layerbase.cli.common import Context, emit, json_option, names, plot_option, table
from layerbase.warehouse.errors import InputError

if TYPE_CHECKING:
    from layerbase.analysis.geometry.tokens import LocalResult
    from layerbase.warehouse.engine import Warehouse

matrix_option = click.option(
    "--matrix",
    type=click.Choice(["input", "output"]),
    default="input",
    show_default=True,
    help="Input embeddings, or unembeddings (stored only where untied).",
)
seed_option = click.option("--seed", type=int, default=0, show_default=True, help="Seed of the token sample.")


@click.group()
def geometry() -> None:
    """Token-embedding geometry across models (needs `layerbase embeddings export` first)."""


@geometry.command("global")
@click.option("--models", required=True, help="Comma-separated stored model names (every pair is compared).")
@matrix_option
@click.option("--sample", type=int, default=4000, show_default=True, help="Matched tokens sampled (0: all).")
@click.option(
    "--sample-rule",
    type=click.Choice(["uniform", "frequent"]),
    default="uniform",
    show_default=True,
    help="uniform: a seeded sample; frequent: the lowest token ids of the first model (BPE merge order).",
)
@click.option(
    "--center",
    is_flag=True,
    help="Subtract each model's mean embedding first (removes the common "
    "direction that makes raw cosine similarities alike).",
)
@seed_option
@plot_option
@click.option("--progress/--no-progress", default=True, help="Show a progress bar over the model pairs.")
@json_option
@click.pass_obj
def global_(
    obj: Context,
    models: str,
    matrix: str,
    sample: int,
    sample_rule: str,
    center: bool,
    seed: int,
    plot: Path | None,
    progress: bool,
    as_json: bool,
) -> None:
    """Pearson correlation of token-token cosine similarities over matched tokens."""
    chosen = names(models)
    matrix_values, results = obj.api().geometry_global(
        chosen,
        matrix=matrix,
        sample=sample or None,
        seed=seed,
        sample_rule=sample_rule,
        center=center,
        progress=progress,
    )
    if plot is not None:
        from layerbase.analysis.reporting.plots import model_matrix, save

        save(
            model_matrix(
                matrix_values,
                chosen,
                f"Global token geometry ({matrix} embeddings"
                f"{', centred' if center else ''}), {sample_rule} sample of "
                f"{results[0].n_tokens} matched tokens",
            ),
            plot,
        )
    rows = [r.as_dict() for r in results]
    if as_json:
        emit({"models": chosen, "matrix": matrix_values.round(6).tolist(), "pairs": rows}, True)
        return
    shown = [
        {
            "run": r["id"],
            "model_a": r["model_a"],
            "model_b": r["model_b"],
            "shared": r["matching"]["shared"],
            "tokens": r["n_tokens"],
            "pearson": f"{r['pearson']:.4f}",
            "spearman": f"{r['spearman']:.4f}",
        }
        for r in rows
    ]
    click.echo(table(shown, ["run", "model_a", "model_b", "shared", "tokens", "pearson", "spearman"]))
    first = rows[0]["matching"]
    click.echo(f"matching: {first['rule']}; sample: {first['sample_rule']}; centred: {center}")
    if plot is not None:
        click.echo(f"figure: {plot}")


@geometry.command("local")
@click.option("--models", required=True, help="Two stored model names, A,B: A's neighbours and weights reconstruct B.")
@matrix_option
@click.option("--sample", type=int, default=2000, show_default=True, help="Tokens analysed (0: all matched).")
@click.option("-k", "k", type=int, default=10, show_default=True, help="Neighbours for the LLE weights.")
@click.option("--id-k", type=int, default=50, show_default=True, help="Neighbourhood size for the intrinsic dimension.")
@click.option(
    "--threshold",
    type=float,
    default=0.9,
    show_default=True,
    help="Variance share the intrinsic dimension's components must explain.",
)
@click.option(
    "--regularizer",
    type=float,
    default=1e-3,
    show_default=True,
    help="LLE ridge, times the trace of the local Gram matrix.",
)
@seed_option
@click.option("--show", type=int, default=10, show_default=True, help="Lowest- and highest-ID tokens listed.")
@plot_option
@json_option
@click.pass_obj
def local(
    obj: Context,
    models: str,
    matrix: str,
    sample: int,
    k: int,
    id_k: int,
    threshold: float,
    regularizer: float,
    seed: int,
    show: int,
    plot: Path | None,
    as_json: bool,
) -> None:
    """LLE weights and intrinsic dimensions of a token sample, compared across two models."""
    pair = names(models)
    if len(pair) != 2:
        raise InputError("--models takes exactly two names, A,B")
    lb = obj.api()
    result = lb.geometry_local(
        pair[0],
        pair[1],
        matrix=matrix,
        sample=sample or None,
        seed=seed,
        k=k,
        id_k=id_k,
        threshold=threshold,
        regularizer=regularizer,
        show=show,
    )
    if plot is not None:
        _plot_local(lb.warehouse, result, plot)
    if as_json:
        emit(result.as_dict(), True)
        return
    r = result
    click.echo(
        f"local geometry run {r.id}: {r.model_a} -> {r.model_b}, {r.n_tokens} tokens "
        f"(neighbours among {r.n_candidates} matched), k = {r.k}, regulariser {r.regularizer:g}"
    )
    click.echo(f"median relative error reconstructing {r.model_b}'s token:")
    click.echo(f"  own neighbours and weights   {r.err_own:.4f}")
    click.echo(f"  A's neighbours, refitted     {r.err_refit:.4f}")
    click.echo(f"  A's neighbours and weights   {r.err_transfer:.4f}")
    click.echo(f"  A's neighbours, random       {r.err_random:.4f}")
    corr = "n/a" if r.id_pearson is None else f"Pearson {r.id_pearson:.4f}, Spearman {r.id_spearman:.4f}"
    click.echo(
        f"intrinsic dimension ({r.id_k} neighbours, {r.variance_threshold:g} of the variance): mean "
        f"{r.mean_id_a:.2f} in {r.model_a}, {r.mean_id_b:.2f} in {r.model_b}; correlation {corr}"
    )
    for title, rows in (("lowest", r.lowest), ("highest", r.highest)):
        click.echo(f"{title}-ID tokens (ID in A/B: neighbours in A):")
        for t in rows:
            click.echo(
                f"  {t['text']!r:<16} {t['id_a']:>3}/{t['id_b']:<3} " + ", ".join(repr(n) for n in t["neighbors"])
            )
    if plot is not None:
        click.echo(f"figure: {plot}")


def _plot_local(wh: Warehouse, result: LocalResult, path: Path) -> None:
    import numpy as np
    import sqlalchemy as sa

    from layerbase.analysis.reporting.plots import local_geometry, save
    from layerbase.warehouse.models import GeometryLocalToken as T

    with wh.engine.connect() as conn:
        rows = conn.execute(
            sa.select(T.id_a, T.id_b, T.err_own, T.err_refit, T.err_transfer, T.err_random).where(T.run_id == result.id)
        ).all()
    data = np.array(rows, dtype=float)
    errors = {
        "B's own neighbours and weights": data[:, 2],
        "A's neighbours, weights refitted in B": data[:, 3],
        "A's neighbours and weights": data[:, 4],
        "A's neighbours, random weights": data[:, 5],
    }
    save(
        local_geometry(
            data[:, 0],
            data[:, 1],
            errors,
            result.model_a,
            result.model_b,
            f"Local token geometry, {result.model_a} -> {result.model_b} ({result.n_tokens} tokens)",
        ),
        path,
    )
