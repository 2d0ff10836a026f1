"""``layerbase knn``, ``affinity`` and ``neighbors``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from layerbase.cli.common import (
    TEXT,
    Context,
    emit,
    json_option,
    names,
    neighbors_answer,
    plot_option,
    progress_option,
    records,
    table,
)

if TYPE_CHECKING:
    from layerbase.analysis.similarity.affinity import AffinityMatrix

# The engine names, kept here so that `--help` does not import the analysis stack.
ENGINES = ["blas", "sql", "ivfflat", "hnsw"]


@click.command()
@click.option("--model", "model", required=True, help="Stored model name.")
@click.option("--dataset", "dataset", required=True, help="Dataset the model was ingested on.")
@click.option("--layers", help="Layers, e.g. '1-5,7' (default: all stored layers but 0).")
@click.option(
    "--k-max", type=int, help="Neighbours stored per prompt (default: 100, or the prompts - 1 of a smaller dataset)."
)
@click.option(
    "--engine",
    type=click.Choice(ENGINES),
    default="blas",
    show_default=True,
    help="blas: exact, in memory (fastest everywhere measured); sql: exact pgvector scan; "
    "ivfflat, hnsw: approximate, through a partial index, recall-tuned (ivfflat builds in a "
    "fraction of hnsw's time).",
)
@click.option("--ef-search", type=click.IntRange(1), help="hnsw: the ef_search to start from (default: 2(k_max + 1)).")
@click.option("--probes", type=click.IntRange(1), help="ivfflat: the probes to start from (default: lists / 20).")
@click.option(
    "--hnsw-m",
    "m",
    type=int,
    help="hnsw: the index's m, links per node (default: the existing "
    "index's, else pgvector's 16). Another value rebuilds the index.",
)
@click.option(
    "--ef-construction",
    type=int,
    help="hnsw: the index's ef_construction (default: the existing "
    "index's, else pgvector's 64). Lower builds faster and needs a wider search for the same recall.",
)
@click.option(
    "--lists", type=int, help="ivfflat: the index's lists (default: the existing index's, else sqrt(prompts))."
)
@click.option(
    "--min-recall",
    type=click.FloatRange(0, 1),
    default=0.99,
    show_default=True,
    help="ivfflat, hnsw: widen the search until recall@10 on a sample of 200 prompts reaches this "
    "(its 95 % lower confidence bound).",
)
@click.option(
    "--workers",
    type=click.IntRange(1),
    help="sql, ivfflat, hnsw: connections querying at once (default: the cores here, at most 4).",
)
@click.option("--force", is_flag=True, help="Recompute sets that are already stored.")
@progress_option
@json_option
@click.pass_obj
def knn(
    obj: Context,
    model: str,
    dataset: str,
    layers: str | None,
    k_max: int | None,
    engine: str,
    ef_search: int | None,
    probes: int | None,
    m: int | None,
    ef_construction: int | None,
    lists: int | None,
    min_recall: float,
    workers: int | None,
    force: bool,
    progress: bool,
    as_json: bool,
) -> None:
    """Materialize every prompt's k nearest prompts (cosine, self excluded) per layer."""
    from layerbase.analysis.knn.search import describe_search

    rows = records(
        obj.api().knn(
            model,
            dataset,
            k=k_max,
            engine=engine,
            layers=layers,
            ef_search=ef_search,
            probes=probes,
            m=m,
            ef_construction=ef_construction,
            lists=lists,
            min_recall=min_recall,
            workers=workers,
            force=force,
            progress=progress,
        )
    )
    shown = []
    for r in rows:
        shown.append(
            {
                **r,
                "seconds": round(r["seconds"], 2),
                "recall@10": "" if r["recall"] is None else f"{r['recall']:.3f}",
                "search": describe_search(r["search"]),
            }
        )
    emit(
        rows,
        as_json,
        table(shown, ["layer", "engine", "strategy", "k_max", "n_prompts", "seconds", "recall@10", "search", "reused"]),
    )


# The measures and preprocessings, kept here so that `--help` does not import the analysis stack
# (tests check that they match the API's).
MEASURE_NAMES = (
    "mutual_knn",
    "jaccard_knn",
    "cknna",
    "linear_cka",
    "unbiased_cka",
    "rbf_cka",
    "svcca",
    "pwcca",
    "procrustes",
    "rsa",
)
PREPROCESS_NAMES = ("none", "center", "clamp95")


def _cells(text: str | None) -> list[tuple[int, int]]:
    """'3:5,10:7' -> [(3, 5), (10, 7)]."""
    if not text:
        return []
    try:
        return [(int(a), int(b)) for a, b in (part.split(":") for part in text.split(",") if part.strip())]
    except ValueError:
        raise click.BadParameter(f"{text!r}: give cells as LAYER_A:LAYER_B, comma-separated (e.g. 3:5,10:7)") from None


@click.command()
@click.option("--models", required=True, help="Comma-separated stored model names (every pair is computed).")
@click.option("--dataset", required=True, help="Dataset (read by every model, or by the first of a parallel pair).")
@click.option("--dataset-b", help="Parallel dataset read by the second model (prompt i <-> prompt i).")
@click.option(
    "--measure",
    "measures",
    default="mutual_knn",
    show_default=True,
    help=f"Similarity measure(s), comma-separated: {', '.join(MEASURE_NAMES)} (docs/measures.md).",
)
@click.option("-k", "k", type=int, default=10, show_default=True, help="Neighbourhood size (k-NN measures).")
@click.option(
    "--preprocess",
    type=click.Choice(PREPROCESS_NAMES),
    default="none",
    show_default=True,
    help="How measures see the activations: as stored, mean-centered, or clamped at the 95th percentile of |x| "
    "(platonic-rep's outlier clamp).",
)
@click.option(
    "--rbf-bandwidth",
    type=float,
    default=1.0,
    show_default=True,
    help="rbf_cka: sigma as a fraction of the median pairwise distance.",
)
@click.option(
    "--cca-dims", type=int, default=10, show_default=True, help="svcca, pwcca: SVD directions kept per layer."
)
@click.option(
    "--permutations",
    type=int,
    default=10,
    show_default=True,
    help="Shuffles of the second model's prompts for the null level of measures without a closed form (0: none).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the permutations and the bootstrap.")
@click.option(
    "--bootstrap",
    type=int,
    default=0,
    show_default=True,
    help="Resamples of the prompts for confidence intervals of the diagonal test's statistic (0: none).",
)
@click.option("--bootstrap-cells", help="Also intervals of these cells, LAYER_A:LAYER_B comma-separated.")
@click.option("--level", type=float, default=0.95, show_default=True, help="Confidence level of the intervals.")
@click.option("--layer0", is_flag=True, help="Include layer 0 (the embedding output) in the matrix.")
@click.option(
    "--engine",
    type=click.Choice(ENGINES),
    default="blas",
    show_default=True,
    help="Engine for k-NN sets not yet stored.",
)
@click.option("--study", help="Name of the study (default: from the models and datasets).")
@click.option(
    "--overlap",
    type=click.Choice(["numpy", "sql"]),
    default="numpy",
    show_default=True,
    help="Where the shared neighbours of all layer pairs are counted: here from the stored neighbour arrays, "
    "or by one join in SQL (identical matrices).",
)
@click.option("--show-matrix", is_flag=True, help="Print the matrices.")
@click.option(
    "--recompute",
    is_flag=True,
    help="Compute new runs even where current ones are stored (stored runs are never replaced).",
)
@plot_option
@progress_option
@json_option
@click.pass_obj
def affinity(
    obj: Context,
    models: str,
    dataset: str,
    dataset_b: str | None,
    measures: str,
    k: int,
    preprocess: str,
    rbf_bandwidth: float,
    cca_dims: int,
    permutations: int,
    seed: int,
    bootstrap: int,
    bootstrap_cells: str | None,
    level: float,
    layer0: bool,
    engine: str,
    study: str | None,
    overlap: str,
    show_matrix: bool,
    recompute: bool,
    plot: Path | None,
    progress: bool,
    as_json: bool,
) -> None:
    """Layer x layer similarity matrices (mutual k-NN by default) for every pair of models,
    with the null level and the diagonal test, for each --measure.

    A pair's current stored run of the measure and its parameters is reused (one whose k-NN
    sets were not recomputed since); otherwise a new run is added. --plot writes each
    matrix's heatmap (PATH, or PATH-<model a>-<model b>[-<measure>].png for several)."""
    api = obj.api()
    matrices = [
        m
        for measure in names(measures)
        for m in api.affinity_study(
            names(models),
            dataset,
            dataset_b,
            measure=measure,
            k=k,
            preprocess=preprocess,
            rbf_bandwidth=rbf_bandwidth,
            cca_dims=cca_dims,
            permutations=permutations,
            seed=seed,
            bootstrap=bootstrap,
            bootstrap_cells=_cells(bootstrap_cells),
            level=level,
            layer0=layer0,
            engine=engine,
            study=study,
            overlap=overlap,
            recompute=recompute,
            progress=progress,
        )
    ]
    if plot is not None:
        from layerbase.analysis.reporting.plots import save

        several_measures = len({m.measure for m in matrices}) > 1
        for m in matrices:
            suffix = f"-{m.measure}" if several_measures else ""
            where = (
                plot
                if len(matrices) == 1
                else plot.with_name(f"{plot.stem}-{m.model_a}-{m.model_b}{suffix}{plot.suffix}")
            )
            save(m.plot(), where)
            if not as_json:
                click.echo(f"Heatmap: {where}")
    if as_json:
        emit(
            [
                {**m.summary(), "layers_a": m.layers_a, "layers_b": m.layers_b, "scores": m.scores.round(6).tolist()}
                for m in matrices
            ],
            True,
        )
        return
    for m in matrices:
        click.echo(describe_affinity(m, show_matrix))


@click.command("affinity-runs")
@click.option("--all", "show_all", is_flag=True, help="Also the runs that a newer run of their pair superseded.")
@json_option
@click.pass_obj
def affinity_runs(obj: Context, show_all: bool, as_json: bool) -> None:
    """The stored affinity runs: id, models, datasets, k, diagonal test, and whether current."""
    frame = obj.api().affinity_runs()
    if not show_all and len(frame):
        frame = frame[frame["is_current"]]
    rows = records(frame)
    for r in rows:
        r["test"] = (
            ""
            if r["mean_on"] is None
            else f"t = {r['t']:.2f}"
            if r["t"] is not None
            else f"undefined: {r['undefined_reason']}"
        )
    columns = [
        "run_id",
        "model_a",
        "model_b",
        "dataset_a",
        "dataset_b",
        "measure",
        "k",
        "pair_kind",
        "is_current",
        "test",
    ]
    emit(rows, as_json, table(rows, columns))


def describe_affinity(m: AffinityMatrix, show_matrix: bool) -> str:
    """An affinity matrix in a few lines: measure, shape, null level, the diagonal test, the
    bootstrap intervals and the path."""
    shape = f"{len(m.layers_a)}x{len(m.layers_b)}"
    null = (
        "no null level"
        if m.chance is None
        else f"chance {m.chance:.4f}"
        + (f" ({m.parameters['permutations']} permutations)" if m.null_method == "permutation" else "")
    )
    parameters = f" ({m.describe_parameters})" if m.describe_parameters else ""
    lines = [
        f"{m.model_a} × {m.model_b} on {m.dataset_a}"
        + (f" | {m.dataset_b}" if m.dataset_b != m.dataset_a else "")
        + f", {m.label}{parameters}: {shape} layers, |D| = {m.n_prompts}, {null}, max {m.scores.max():.3f} "
        f"(affinity run {m.run_id})"
    ]
    t = m.test
    if t is not None:
        lines.append(f"  diagonal test: {t.describe()}")
    for i, settings in zip(m.intervals, m.interval_settings):
        what = f"cell {i.layer_a}:{i.layer_b}" if i.statistic == "cell" else i.statistic.replace("_", " ")
        lines.append(
            f"  {what}: {i.estimate:.4f}, {settings[2]:.0%} interval [{i.low:.4f}, {i.high:.4f}] "
            f"({settings[0]} bootstrap resamples, seed {settings[1]})"
        )
    lines.append(
        "  max-similarity path (layer A -> layer B): "
        + ", ".join(f"{a}->{b}" for a, b in zip(m.path["layer_a"], m.path["layer_b"]))
    )
    if show_matrix:
        header = "      " + " ".join(f"{b:>5}" for b in m.layers_b)
        lines.append(header)
        lines += [f"{a:>5} " + " ".join(f"{v:5.3f}" for v in row) for a, row in zip(m.layers_a, m.scores)]
    return "\n".join(lines)


@click.command()
@click.option("--model", required=True, help="Stored model name.")
@click.option("--layer", type=int, required=True)
@click.option("--dataset", required=True)
@click.option(
    "--prompt", "position", type=int, help="Position of a stored prompt in the dataset, 0-based (`layerbase prompts`)."
)
@click.option("--text", type=TEXT, help="A new text, embedded on the fly with the model's stored settings.")
@click.option("-k", "k", type=int, default=10, show_default=True)
@click.option("--where-text", type=TEXT, help="Only prompts whose text contains this (case-insensitive).")
@click.option("--where-source", type=TEXT, help="Only prompts whose source (file, line) matches this LIKE pattern.")
@click.option("--vs-model", help="Compare with this model's neighbours of the same prompt (overlap).")
@click.option("--vs-layer", type=int, help="Layer of --vs-model.")
@click.option("--vs-dataset", help="Dataset of --vs-model (default: --dataset; may be its parallel).")
@click.option(
    "--exact",
    is_flag=True,
    help="Never use the approximate HNSW index: a stored exact k-NN set or an exact scan answers.",
)
@click.option(
    "--ef-search",
    type=click.IntRange(1, 1000),  # 1000: pgvector's largest ef_search
    help="HNSW lookups: the ef_search (default: the one `knn --engine hnsw` tuned for the layer, else 200).",
)
@json_option
@click.pass_obj
def neighbors(
    obj: Context,
    model: str,
    layer: int,
    dataset: str,
    position: int | None,
    text: str | None,
    k: int,
    where_text: str | None,
    where_source: str | None,
    vs_model: str | None,
    vs_layer: int | None,
    vs_dataset: str | None,
    exact: bool,
    ef_search: int | None,
    as_json: bool,
) -> None:
    """The k nearest prompts of a stored prompt or a new text at (model, layer)."""
    lb = obj.api()
    if vs_model or vs_layer is not None:
        if where_text is not None or where_source is not None:
            raise click.UsageError("--where-text and --where-source limit a lookup, not an overlap (--vs-model)")
        if position is None or vs_layer is None:
            raise click.UsageError("an overlap needs --prompt, --vs-model (default: --model) and --vs-layer")
        both = lb.overlap(position, (model, layer, dataset), (vs_model or model, vs_layer, vs_dataset or dataset), k)
        sides = [
            neighbors_answer(
                both[both["side"] == side].drop(columns=["side", "model", "layer", "shared"]), both.attrs[side]
            )
            for side in ("first", "second")
        ]
        shared = set(both.attrs["shared"])
        if as_json:
            emit(
                {"first": sides[0], "second": sides[1], "shared": sorted(shared), "overlap": both.attrs["overlap"]},
                True,
            )
            return
        for side in sides:
            click.echo(_neighbors_text(side, shared))
        click.echo(f"Shared: {len(shared)} of {k} ({', '.join(map(str, sorted(shared))) or 'none'})")
        return
    found = lb.neighbors(
        model,
        dataset,
        layer,
        prompt=position,
        text=text,
        k=k,
        exact=exact,
        ef_search=ef_search,
        where_text=where_text,
        where_source=where_source,
    )
    answer = neighbors_answer(found, found.attrs)
    emit(answer, as_json, _neighbors_text(answer, set()))


def _neighbors_text(answer: dict, shared: set[int]) -> str:
    lines = [
        f"{answer['model']} layer {answer['layer']} on {answer['dataset']} — {' '.join(answer['query'].split())[:90]}",
        f"  answered by: {answer['path']}",
        *([f"  only prompts whose {answer['only']}"] if answer.get("only") else []),
        # Cosine distances to 8 decimals: last-token activations are nearly collinear, and
        # neighbours 1e-5 apart are common.
        f"  {'':1}{'rank':>4}  {'position':>8}  {'cosine distance':>15}  text",
    ]
    for rank, row in enumerate(answer["neighbors"], start=1):
        mark = "*" if row["position"] in shared else " "
        snippet = row["text"].replace("\n", " ")[:70]
        lines.append(f"  {mark}{rank:>4}  {row['position']:>8}  {row['distance']:>15.8f}  {snippet}")
    return "\n".join(lines)


@click.command()
@click.option("--models", required=True, help="Comma-separated stored model names (at least two).")
@click.option("--datasets", required=True, help="Comma-separated datasets every model was ingested on.")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("layerbase-report"),
    show_default=True,
    help="Directory for report.html and the PNG files.",
)
@click.option("-k", "k", type=int, default=10, show_default=True)
@click.option("--prompt", type=int, default=0, show_default=True, help="Prompt whose neighbours are shown.")
@click.option("--square-size", type=int, default=32, show_default=True, help="Grid of the relative-depth matrices.")
@click.option(
    "--format",
    "export_format",
    type=click.Choice(["csv", "parquet", "json"]),
    help="Also export every table of the report in this format (under OUT/tables).",
)
@click.option(
    "--measures",
    help="Also show every model pair under these similarity measures (comma-separated, or 'all'), side by side "
    "with their diagonal tests and rank correlations.",
)
@click.option(
    "--preprocess", type=click.Choice(PREPROCESS_NAMES), default="none", show_default=True, help="As for affinity."
)
@click.option("--permutations", type=int, default=10, show_default=True, help="As for affinity.")
@click.option("--seed", type=int, default=0, show_default=True, help="As for affinity.")
@progress_option
@json_option
@click.pass_obj
def report(
    obj: Context,
    models: str,
    datasets: str,
    out_dir: Path,
    k: int,
    prompt: int,
    square_size: int,
    export_format: str | None,
    measures: str | None,
    preprocess: str,
    permutations: int,
    seed: int,
    progress: bool,
    as_json: bool,
) -> None:
    """Write a self-contained HTML report with affinity heatmaps, tests and neighbour lists."""
    result = obj.api().report(
        names(models),
        names(datasets),
        out_dir,
        k=k,
        prompt=prompt,
        square_size=square_size,
        export_format=export_format,
        measures=list(MEASURE_NAMES) if measures == "all" else names(measures) if measures else [],
        preprocess=preprocess,
        permutations=permutations,
        seed=seed,
        progress=progress,
    )
    text = "\n".join(
        [f"Report: {result.html}", f"Figures: {len(result.images)} PNG files in {out_dir}"]
        + ([f"Tables: {len(result.exported)} {export_format} files in {out_dir / 'tables'}"] if result.exported else [])
        + [f"Warning: {w}" for w in result.warnings]
    )
    emit(result.as_dict(), as_json, text)
