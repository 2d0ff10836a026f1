"""The Python API: ``layerbase.connect()`` and the ``Layerbase`` object it returns.

One object per warehouse. Its methods are the operations the CLI offers, returning what a
notebook wants: pandas DataFrames for listings and neighbour sets, numpy arrays for
activations, and result objects with ``.to_pandas()`` and ``.plot()`` for affinity
matrices. The CLI's commands call these same methods. Models loaded for text lookups and
steering stay in the object's model cache, so a second call is warm.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from numbers import Integral
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

from layerbase.analysis.similarity.measures import MEASURES as _MEASURE_SPECS
from layerbase.analysis.similarity.measures import PREPROCESSING as PREPROCESSING
from layerbase.warehouse.engine import Warehouse
from layerbase.warehouse.engine import connect as connect_warehouse
from layerbase.warehouse.errors import InputError

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from layerbase.analysis.geometry.tokens import GlobalResult, LocalResult
    from layerbase.analysis.knn.lookup import Neighbors
    from layerbase.analysis.reporting.report import Report
    from layerbase.analysis.similarity.affinity import AffinityMatrix
    from layerbase.analysis.similarity.measures import MeasureOptions
    from layerbase.analysis.steering.emb2emb import MapInfo
    from layerbase.analysis.steering.vectors import EvalResult, PromptSource, VectorInfo
    from layerbase.ingest.model_cache import ModelCache
    from layerbase.ingest.runner import JobReport

# A prompt set for a steering vector: a stored dataset's name, "preset:NAME:SIDE", a file
# of one prompt per line, or the texts themselves.
PromptsArg = str | Path | Sequence[str]

# The similarity measures of a layer pair that the warehouse computes and stores
# (docs/measures.md), and how a measure may see the activations.
MEASURES = tuple(_MEASURE_SPECS)


def connect(url: str | None = None, *, upgrade: bool = True, progress: bool = True) -> Layerbase:
    """Open a warehouse: ``url`` is any PostgreSQL URL with pgvector; without one,
    ``$LAYERBASE_DATABASE_URL``, ``$DATABASE_URL``, else the embedded server (started on
    demand). With ``upgrade`` (the default) the schema is created or brought to the code's
    revision first, as ``layerbase db upgrade`` does; without it an old schema is refused."""
    if upgrade:
        from layerbase.warehouse.status import upgrade_schema

        upgrade_schema(connect_warehouse(url, check_schema=False))
    return Layerbase(connect_warehouse(url), progress=progress)


@dataclass(frozen=True)
class Transferred:
    """A steering vector mapped into another model: the new vector, the Emb2Emb map that
    carried it, and the norm calibration applied."""

    vector: VectorInfo
    map: MapInfo
    calibration: dict[str, Any]


class Layerbase:
    """A connected warehouse. Make one with ``layerbase.connect()``."""

    def __init__(self, warehouse: Warehouse, *, progress: bool = True, model_memory: int | None = None) -> None:
        from layerbase.ingest.model_cache import ModelCache

        self.warehouse = warehouse
        self.progress = progress
        self.model_cache: ModelCache = ModelCache(model_memory)

    def __repr__(self) -> str:
        kind = "embedded" if self.warehouse.embedded else "server"
        return f"<Layerbase {kind} {self.warehouse.display_url}>"

    @property
    def url(self) -> str:
        """The database URL, password hidden."""
        return self.warehouse.display_url

    def close(self) -> None:
        """Drop the cached models and the connection pool."""
        self.model_cache.clear()
        self.warehouse.engine.dispose()

    def __enter__(self) -> Layerbase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- listings

    def status(self) -> dict[str, Any]:
        """Server and pgvector versions, schema revision, storages offered and row counts."""
        from layerbase.warehouse.status import database_status

        return database_status(self.warehouse)

    def models(self) -> pd.DataFrame:
        """Stored models with their extraction settings, one row each."""
        from layerbase.ingest.catalog import list_models

        return _frame(list_models(self.warehouse), ["name", "source", "architecture", "kind", "n_layers", "width"])

    def datasets(self) -> pd.DataFrame:
        """Registered datasets with their size, source and parallel partner."""
        from layerbase.ingest.datasets import list_datasets

        return _frame(list_datasets(self.warehouse), ["name", "prompts", "kind", "source", "parallel_to"])

    def jobs(self) -> pd.DataFrame:
        """Ingest jobs with their progress and truncation counts."""
        from layerbase.ingest.catalog import list_jobs

        return _frame(list_jobs(self.warehouse), ["id", "model", "dataset", "state", "n_prompts", "done"])

    def prompts(self, dataset: str, limit: int | None = None) -> pd.DataFrame:
        """A dataset's prompts in position order (the first ``limit``, or all)."""
        from layerbase.ingest.datasets import show_prompts

        return _frame(show_prompts(self.warehouse, dataset, limit), ["position", "id", "text"]).set_index("position")

    # ------------------------------------------------------------------- ingest

    def add_dataset(
        self,
        name: str,
        texts_or_path: str | PathLike[str] | Iterable[str],
        *,
        format: str | None = None,
        field: str | None = None,
        lead_paragraphs: int | None = None,
        parallel_to: str | None = None,
        decode_errors: str = "strict",
        sample: int | None = None,
        seed: int = 0,
    ) -> dict[str, Any]:
        """Register prompts as dataset ``name``: a list of texts, or a path (lines, JSONL, CSV,
        Parquet, or a directory of .txt files; ``format`` and ``field`` as in
        ``layerbase dataset add``). Registering the same prompts again is a no-op."""
        from layerbase.ingest.datasets import add_datasets
        from layerbase.ingest.sources import prompts_from_texts, read_path

        if isinstance(texts_or_path, (str, PathLike)):
            prompts = read_path(
                Path(texts_or_path), format, field=field, lead_paragraphs=lead_paragraphs, decode_errors=decode_errors
            )
        else:
            if format or field or lead_paragraphs:
                raise InputError("format, field and lead_paragraphs read a file; give a path, or drop them")
            prompts = prompts_from_texts(texts_or_path)
        return add_datasets(self.warehouse, [(name, prompts.sample(sample, seed))], parallel_to=parallel_to)[0]

    def add_random_dataset(
        self, name: str, count: int = 512, length: int = 32, *, alphabet: str | None = None, seed: int = 0
    ) -> dict[str, Any]:
        """Register ``count`` random strings of ``length`` characters as dataset ``name``."""
        from layerbase.ingest.datasets import add_datasets
        from layerbase.ingest.sources import generate_random

        return add_datasets(self.warehouse, [(name, generate_random(count, length, alphabet, seed))])[0]

    def add_parallel_datasets(
        self,
        left: str,
        right: str,
        path: str | PathLike[str],
        *,
        separator: str = " :: ",
        sample: int | None = None,
        seed: int = 0,
    ) -> list[dict[str, Any]]:
        """Register a file of 'left SEP right' lines (e.g. German :: English) as two parallel
        datasets: prompt i of ``left`` is the translation of prompt i of ``right``."""
        from layerbase.ingest.datasets import add_datasets
        from layerbase.ingest.sources import read_pairs

        if left == right:
            raise InputError("the two parallel datasets need different names")
        first, second = read_pairs(Path(path), separator)
        return add_datasets(self.warehouse, [(left, first.sample(sample, seed)), (right, second.sample(sample, seed))])

    def add_hf_dataset(
        self,
        name: str,
        hf_name: str,
        *,
        split: str = "train",
        field: str = "text",
        config: str | None = None,
        sample: int | None = None,
        seed: int = 0,
    ) -> dict[str, Any]:
        """Register a Hugging Face dataset's text column as ``name`` (needs the hub or its cache)."""
        from layerbase.ingest.datasets import add_datasets
        from layerbase.ingest.sources import read_hf

        prompts = read_hf(hf_name, split, field, config).sample(sample, seed)
        return add_datasets(self.warehouse, [(name, prompts)])[0]

    @overload
    def ingest(
        self,
        model: str,
        dataset: str,
        *,
        name: str | None = None,
        revision: str | None = None,
        dtype: str = "float32",
        device: str | None = None,
        pooling: str = "last",
        padding_side: str = "right",
        max_tokens: int | None = None,
        chat_template: bool = False,
        layer0: bool = False,
        batch_size: int = 16,
        storage: str = "float32",
        progress: bool | None = None,
    ) -> JobReport: ...

    @overload
    def ingest(
        self,
        model: str,
        dataset: list[str] | tuple[str, ...],
        *,
        name: str | None = None,
        revision: str | None = None,
        dtype: str = "float32",
        device: str | None = None,
        pooling: str = "last",
        padding_side: str = "right",
        max_tokens: int | None = None,
        chat_template: bool = False,
        layer0: bool = False,
        batch_size: int = 16,
        storage: str = "float32",
        progress: bool | None = None,
    ) -> list[JobReport]: ...

    def ingest(
        self,
        model: str,
        dataset: str | Sequence[str],
        *,
        name: str | None = None,
        revision: str | None = None,
        dtype: str = "float32",
        device: str | None = None,
        pooling: str = "last",
        padding_side: str = "right",
        max_tokens: int | None = None,
        chat_template: bool = False,
        layer0: bool = False,
        batch_size: int = 16,
        storage: str = "float32",
        progress: bool | None = None,
    ) -> JobReport | list[JobReport]:
        """Run ``model`` (a packaged name, Hugging Face id, directory or .gguf file) over one
        or several datasets and store every decoder block's pooled activation per prompt.
        Idempotent and resumable; returns one report per dataset (one, for one name)."""
        from layerbase.ingest.extract import ExtractionSettings
        from layerbase.ingest.runner import ingest_datasets

        names = [dataset] if isinstance(dataset, str) else list(dataset)
        reports = ingest_datasets(
            self.warehouse,
            model,
            names,
            name=name,
            revision=revision,
            dtype=dtype,
            device=device,
            settings=ExtractionSettings(pooling, padding_side, max_tokens, chat_template),
            include_layer0=layer0,
            batch_size=batch_size,
            progress=self._progress(progress),
            storage=storage,
        )
        return reports[0] if isinstance(dataset, str) else reports

    def export_embeddings(
        self,
        model: str,
        *,
        name: str | None = None,
        revision: str | None = None,
        dtype: str = "float32",
        device: str | None = None,
        progress: bool | None = None,
    ) -> dict[str, Any]:
        """Store a model's input embeddings (and unembeddings, when untied), one row per token."""
        from layerbase.ingest.embeddings import export_token_embeddings
        from layerbase.ingest.loading import default_model_name, open_model

        lm = open_model(model, revision=revision, dtype=dtype, device=device, progress=self._progress(progress))
        stored_as = name or default_model_name(model)
        written = export_token_embeddings(self.warehouse, lm, stored_as, progress=self._progress(progress))
        return {"model": stored_as, "rows": written, "tied": lm.tied_embeddings}

    # ---------------------------------------------------------------- read back

    def activations(self, model: str, dataset: str, layer: int) -> np.ndarray:
        """The stored activations of (model, dataset, layer): float32 [n_prompts, width],
        row i = the prompt at position i."""
        from layerbase.analysis.vectors import stored_layer

        layer = _layer(layer, "activations(model, dataset, layer)")
        return stored_layer(self.warehouse, model, dataset, layer)

    # ---------------------------------------------------------------- analyses

    def knn(
        self,
        model: str,
        dataset: str,
        *,
        k: int | None = None,
        engine: str = "blas",
        layers: str | list[int] | None = None,
        force: bool = False,
        progress: bool | None = None,
        **options: Any,
    ) -> pd.DataFrame:
        """Materialize every prompt's ``k`` nearest prompts (cosine, self excluded) per layer,
        reusing stored sets of at least ``k`` (default 100, or n - 1 for fewer prompts); one row
        per layer. ``options`` are those of ``layerbase knn`` (ef_search, probes, m,
        ef_construction, lists, min_recall, workers)."""
        import pandas as pd

        from layerbase.analysis.knn.materialize import materialize

        results = materialize(
            self.warehouse,
            model,
            dataset,
            layers=layers,
            k_max=k,
            engine=engine,
            force=force,
            progress=self._progress(progress),
            **options,
        )
        return pd.DataFrame([r.as_dict() for r in results])

    def affinity(
        self,
        model_a: str,
        model_b: str,
        dataset: str,
        *,
        measure: str = "mutual_knn",
        k: int = 10,
        dataset_b: str | None = None,
        layer0: bool = False,
        preprocess: str = "none",
        rbf_bandwidth: float = 1.0,
        cca_dims: int = 10,
        permutations: int = 10,
        seed: int = 0,
        bootstrap: int = 0,
        bootstrap_cells: Sequence[tuple[int, int]] = (),
        level: float = 0.95,
        engine: str = "blas",
        overlap: str = "numpy",
        recompute: bool = False,
        progress: bool | None = None,
    ) -> AffinityMatrix:
        """The layer x layer matrix of a similarity ``measure`` (one of ``MEASURES``) between two
        models (rows: ``model_a``'s layers), with its null level, diagonal test and
        max-similarity path: the current stored run of that measure and those parameters
        (none of the k-NN sets it used was recomputed since), else computed and stored as a
        new run; ``recompute`` always adds one. Stored runs never change.

        ``k``: the neighbourhood of the k-NN measures (mutual_knn, jaccard_knn, cknna).
        ``preprocess``: ``none`` (the activations as stored), ``center`` or ``clamp95``.
        ``rbf_bandwidth``: rbf_cka's sigma as a fraction of the median distance. ``cca_dims``:
        SVD directions kept by svcca and pwcca. ``permutations`` of model B's prompts give the
        null level of the measures without a closed form (``seed`` fixes them, and the
        bootstrap). ``bootstrap``: resamples of the prompts for percentile intervals
        (``level``) of the diagonal test's statistic and of ``bootstrap_cells`` ((layer A,
        layer B) pairs), in ``.intervals``. ``dataset_b``: a parallel dataset that ``model_b``
        reads (prompt i <-> prompt i). ``engine`` computes missing k-NN sets; ``overlap`` counts
        mutual k-NN's shared neighbours (``numpy`` in this process, or ``sql``)."""
        from layerbase.analysis.similarity.affinity import compute_affinity

        return compute_affinity(
            self.warehouse,
            model_a,
            model_b,
            dataset,
            dataset_b,
            measure=measure,
            k=k,
            options=_measure_options(preprocess, rbf_bandwidth, cca_dims, permutations, seed),
            include_layer0=layer0,
            engine=engine,
            overlap=overlap,
            recompute=recompute,
            any_study=True,
            bootstrap=bootstrap,
            bootstrap_cells=bootstrap_cells,
            level=level,
            progress=self._progress(progress),
        )

    def affinity_study(
        self,
        models: Sequence[str],
        dataset: str,
        dataset_b: str | None = None,
        *,
        measure: str = "mutual_knn",
        k: int = 10,
        layer0: bool = False,
        preprocess: str = "none",
        rbf_bandwidth: float = 1.0,
        cca_dims: int = 10,
        permutations: int = 10,
        seed: int = 0,
        bootstrap: int = 0,
        bootstrap_cells: Sequence[tuple[int, int]] = (),
        level: float = 0.95,
        engine: str = "blas",
        study: str | None = None,
        overlap: str = "numpy",
        recompute: bool = False,
        progress: bool | None = None,
    ) -> list[AffinityMatrix]:
        """The matrix of ``measure`` for every pair of ``models`` (each once, in list order),
        with the diagonal tests Bonferroni-corrected over the pairs: the study's current
        stored runs where there are, new runs for the rest (all new with ``recompute``). The
        options are ``affinity``'s."""
        from layerbase.analysis.similarity.affinity import compute_study

        return compute_study(
            self.warehouse,
            list(models),
            dataset,
            dataset_b,
            measure=measure,
            k=k,
            options=_measure_options(preprocess, rbf_bandwidth, cca_dims, permutations, seed),
            include_layer0=layer0,
            engine=engine,
            study=study,
            overlap=overlap,
            recompute=recompute,
            bootstrap=bootstrap,
            bootstrap_cells=bootstrap_cells,
            level=level,
            progress=self._progress(progress),
        )

    def affinity_runs(self) -> pd.DataFrame:
        """Every stored affinity matrix with its models, datasets, k, diagonal test, and
        whether it is the current run of its pair (``is_current``)."""
        from layerbase.analysis.similarity.affinity import list_runs

        return _frame(
            list_runs(self.warehouse), ["run_id", "model_a", "model_b", "dataset_a", "dataset_b", "measure", "k"]
        )

    def affinity_run(self, run_id: int) -> AffinityMatrix:
        """A stored affinity run by id, exactly as it was computed; a missing id is an error."""
        from layerbase.analysis.similarity.affinity import load_run

        return load_run(self.warehouse, run_id)

    def neighbors(
        self,
        model: str,
        dataset: str,
        layer: int,
        prompt: int | None = None,
        text: str | None = None,
        k: int = 10,
        *,
        exact: bool = False,
        ef_search: int | None = None,
        where_text: str | None = None,
        where_source: str | None = None,
    ) -> pd.DataFrame:
        """The ``k`` nearest prompts of a stored prompt (by its 0-based position) or of a new
        text at (model, layer): position, text, cosine distance. ``where_text`` (a substring,
        case-insensitive) and ``where_source`` (a LIKE pattern on the prompt's source, e.g.
        ``'sports/%'``, one folder of the BBC corpus) limit the answer to the prompts that pass.
        ``.attrs`` holds the query and the path that answered (stored set, index or exact scan)."""
        from layerbase.analysis.knn.lookup import PromptFilter, nearest

        layer = _layer(layer, "neighbors(model, dataset, layer, prompt=… or text=…)")
        answer = nearest(
            self.warehouse,
            model,
            layer,
            dataset,
            position=prompt,
            text=text,
            k=k,
            exact=exact,
            ef_search=ef_search,
            only=PromptFilter(where_text, where_source),
            models=self.model_cache,
        )
        return _neighbors_frame(answer)

    def overlap(
        self, prompt: int, first: tuple[str, int, str], second: tuple[str, int, str], k: int = 10
    ) -> pd.DataFrame:
        """The neighbours of one prompt at two places, each ``(model, layer, dataset)``
        (datasets may be parallel): one row per neighbour and side, ``shared`` marking those
        in both sets, as in the paper's Venn figures. ``.attrs`` holds each side's query and
        path, the shared positions and the overlap share."""
        import pandas as pd

        from layerbase.analysis.knn.lookup import overlap

        for place in (first, second):
            if not isinstance(place, tuple | list) or len(place) != 3:
                raise InputError(f"each side of an overlap is (model, layer, dataset), not {place!r}")
            _layer(place[1], "overlap(prompt, (model, layer, dataset), (model, layer, dataset))")
        result = overlap(self.warehouse, prompt, first, second, k)
        shared = set(result.shared)
        frames, sides = [], {}
        for side, answer in (("first", result.first), ("second", result.second)):
            frame = _neighbors_frame(answer)
            about = dict(frame.attrs)
            frame = frame.reset_index()
            frame.insert(0, "side", side)
            frame.insert(1, "model", answer.model)
            frame.insert(2, "layer", answer.layer)
            frame["shared"] = frame["position"].isin(shared)
            frames.append(frame)
            sides[side] = about
        out = pd.concat(frames, ignore_index=True)
        out.attrs.update(sides, shared=sorted(shared), overlap=len(shared) / max(1, len(result.first.rows)))
        return out

    # ---------------------------------------------------------------- geometry

    def geometry_global(
        self,
        models: Sequence[str],
        *,
        matrix: str = "input",
        sample: int | None = 4000,
        sample_rule: str = "uniform",
        center: bool = False,
        seed: int = 0,
        progress: bool | None = None,
    ) -> tuple[np.ndarray, list[GlobalResult]]:
        """Global token geometry (Lee et al. 2025): the Pearson correlation of token-token
        cosine similarities over matched tokens, for every pair of ``models`` (a matrix with
        1 on the diagonal, and each pair's stored result). Needs ``export_embeddings`` first."""
        from layerbase.analysis.geometry.tokens import global_matrix

        return global_matrix(
            self.warehouse,
            list(models),
            matrix=matrix,
            sample=sample,
            seed=seed,
            rule=sample_rule,
            center=center,
            progress=self._progress(progress),
        )

    def geometry_local(
        self,
        model_a: str,
        model_b: str,
        *,
        matrix: str = "input",
        sample: int | None = 2000,
        k: int = 10,
        id_k: int = 50,
        threshold: float = 0.9,
        regularizer: float = 1e-3,
        seed: int = 0,
        show: int = 10,
    ) -> LocalResult:
        """Local token geometry (Lee et al. 2025): LLE weights of each sampled token from its
        ``k`` neighbours in ``model_a`` reconstruct it in ``model_b``; intrinsic dimensions of
        ``id_k``-neighbourhoods at a variance ``threshold``, compared across the two."""
        from layerbase.analysis.geometry.tokens import compute_local

        return compute_local(
            self.warehouse,
            model_a,
            model_b,
            matrix_a=matrix,
            matrix_b=matrix,
            sample=sample,
            seed=seed,
            k=k,
            id_k=id_k,
            threshold=threshold,
            regularizer=regularizer,
            show=show,
        )

    # ---------------------------------------------------------------- steering

    def steering_vectors(self) -> pd.DataFrame:
        """Stored steering vectors with their model, layer, method and norms."""
        from layerbase.analysis.steering.vectors import list_vectors

        return _frame(list_vectors(self.warehouse), ["name", "model", "layer", "method", "norm"])

    def steering_vector(self, name: str) -> np.ndarray:
        """A stored steering vector's values (float32)."""
        from sqlalchemy.orm import Session

        from layerbase.analysis.steering.vectors import load_vector

        with Session(self.warehouse.engine) as session:
            return load_vector(session, name)[2]

    def make_steering_vector(
        self,
        model: str,
        layer: int,
        positive: PromptsArg,
        negative: PromptsArg,
        *,
        name: str,
        token_rule: str = "last",
        device: str | None = None,
        batch_size: int = 16,
    ) -> VectorInfo:
        """The mean difference of activations at ``layer`` between positive and negative
        prompts, each side a stored dataset's name, a list of texts, a file of one prompt
        per line (a ``Path``), or a preset such as ``"preset:sentiment:positive"``. Stored
        under ``name`` (vectors are immutable)."""
        from layerbase.analysis.steering.vectors import make_vector

        layer = _layer(layer, "make_steering_vector(model, layer, positive, negative, name=…)")
        pos, neg = (
            self._prompt_source(side, what)
            for side, what in ((positive, "positive prompts"), (negative, "negative prompts"))
        )
        return make_vector(
            self.warehouse,
            model,
            layer,
            pos,
            neg,
            name=name,
            token_rule=token_rule,
            device=device,
            batch_size=batch_size,
            models=self.model_cache,
        )

    def import_steering_vector(
        self, model: str, layer: int, path: str | PathLike[str], *, name: str, token_rule: str = "last"
    ) -> VectorInfo:
        """Store a vector made elsewhere (a .npy or .pt file holding one vector)."""
        from layerbase.analysis.steering.vectors import import_vector

        layer = _layer(layer, "import_steering_vector(model, layer, path, name=…)")
        return import_vector(self.warehouse, model, layer, Path(path), name=name, token_rule=token_rule)

    def compare_vectors(self, first: str, second: str) -> float:
        """Cosine similarity of two stored vectors of one model."""
        from layerbase.analysis.steering.emb2emb import compare_vectors

        return compare_vectors(self.warehouse, first, second)

    def evaluate_steering(
        self,
        vector: str,
        prompts: PromptsArg = "preset:evaluation",
        *,
        positive_words: list[str] | None = None,
        negative_words: list[str] | None = None,
        coefficients: Sequence[float] = (-2.0, -1.0, -0.5, 0.5, 1.0, 2.0),
        n_random: int = 3,
        seed: int = 0,
        batch_size: int = 16,
        device: str | None = None,
        progress: bool | None = None,
    ) -> EvalResult:
        """The shift in log-odds of positive vs negative target words over ``prompts``, per
        coefficient, against the unsteered model and ``n_random`` random vectors of the same
        norm; stored. ``.summary()`` gives one row per coefficient."""
        from layerbase.analysis.steering.vectors import evaluate

        return evaluate(
            self.warehouse,
            vector,
            self._prompt_source(prompts, "evaluation prompts"),
            positive_words=positive_words,
            negative_words=negative_words,
            coefficients=list(coefficients),
            n_random=n_random,
            seed=seed,
            batch_size=batch_size,
            device=device,
            progress=self._progress(progress),
            models=self.model_cache,
        )

    def transfer(
        self,
        vector: str,
        *,
        to: str,
        layer: int | None = None,
        pairs: str = "tokens-input",
        dataset: str | None = None,
        bias: bool = True,
        ridge: float = 0.0,
        seed: int = 0,
        calibrate: str = "contrast",
        name: str | None = None,
        device: str | None = None,
    ) -> Transferred:
        """Map a steering vector into model ``to`` through a least-squares Emb2Emb map (fitted
        on shared-vocabulary token embeddings, or on stored hidden states with
        ``pairs="prompts"``; a stored map is reused), calibrate its norm, and store it.
        ``calibrate``: ``contrast`` (the norm of the target's own vector from the same
        contrast prompts), ``relative`` (the source's norm relative to its activations),
        ``none``, or ``native:VECTOR``."""
        from layerbase.analysis.steering.emb2emb import transfer

        info, map_info, calibration = transfer(
            self.warehouse,
            vector,
            to,
            layer=layer,
            pairs=pairs,
            dataset=dataset,
            bias=bias,
            ridge=ridge,
            seed=seed,
            calibration=calibrate,
            name=name,
            device=device,
            models=self.model_cache,
        )
        return Transferred(info, map_info, calibration)

    def generate(
        self,
        vector: str,
        prompt: str,
        coefficient: float = 1.0,
        *,
        max_new_tokens: int = 40,
        sample: bool = False,
        temperature: float = 1.0,
        seed: int = 0,
        model: str | None = None,
        layer: int | None = None,
        device: str | None = None,
    ) -> dict[str, Any]:
        """Continue ``prompt`` with and without ``coefficient`` x the vector added to the
        residual stream; ``steered`` and ``unsteered`` hold the two continuations."""
        from layerbase.analysis.steering.vectors import generate

        return generate(
            self.warehouse,
            vector,
            prompt,
            coefficient=coefficient,
            max_new_tokens=max_new_tokens,
            sample=sample,
            seed=seed,
            temperature=temperature,
            model_name=model,
            layer=layer,
            device=device,
            models=self.model_cache,
        )

    # ----------------------------------------------------------------- scale-out

    def distribute(self, *, shard_count: int | None = None) -> pd.DataFrame:
        """On a Citus coordinator, distribute the hot tables (activations by model, neighbour
        lists by prompt) and make the rest reference tables; idempotent. One row per table:
        kind, distribution column, shards, and whether this call changed it."""
        import pandas as pd

        from layerbase.warehouse.distribute import distribute

        placed = distribute(self.warehouse, shard_count=shard_count)
        return pd.DataFrame([{**p.as_dict(), "changed": p.changed} for p in placed])

    # ----------------------------------------------------------------- reports

    def report(
        self,
        models: Sequence[str],
        datasets: Sequence[str],
        out: str | PathLike[str] = "layerbase-report",
        *,
        k: int = 10,
        prompt: int = 0,
        square_size: int = 32,
        export_format: str | None = None,
        measures: Sequence[str] = (),
        preprocess: str = "none",
        permutations: int = 10,
        seed: int = 0,
        progress: bool | None = None,
    ) -> Report:
        """Write the self-contained HTML report (affinity heatmaps, tests, neighbour lists)
        for every pair of ``models`` on each of ``datasets``; ``measures`` adds each pair's
        matrix and diagonal test under those measures, side by side, with their rank
        correlations."""
        from layerbase.analysis.reporting.report import build_report

        return build_report(
            self.warehouse,
            list(models),
            list(datasets),
            Path(out),
            k=k,
            prompt=prompt,
            square_size=square_size,
            export_format=export_format,
            measures=measures,
            options=_measure_options(preprocess, 1.0, 10, permutations, seed),
            progress=self._progress(progress),
        )

    # ----------------------------------------------------------------- helpers

    def _progress(self, asked: bool | None) -> bool:
        return self.progress if asked is None else asked

    def _prompt_source(self, side: PromptsArg, what: str) -> PromptSource:
        from layerbase.analysis.steering.vectors import PromptSource, prompt_source

        if isinstance(side, Path):
            return prompt_source(self.warehouse, file=side, what=what)
        if isinstance(side, str):
            if side.startswith("preset:"):
                return prompt_source(self.warehouse, preset=side.removeprefix("preset:"), what=what)
            return prompt_source(self.warehouse, dataset=side, what=what)
        texts = [str(t) for t in side]
        if not texts:
            raise InputError(f"the {what} are empty; give at least one text")
        return PromptSource(f"{len(texts)} texts from Python", texts)


def _layer(layer: Any, call: str) -> int:
    """A layer argument as an int. Arguments in another order (a dataset's name where the
    layer goes) otherwise reach the database as a type error with its SQL."""
    if isinstance(layer, bool) or not isinstance(layer, Integral):
        raise InputError(f"the layer must be a layer number, not {layer!r}: the call is {call}")
    return int(layer)


def _measure_options(
    preprocess: str, rbf_bandwidth: float, cca_dims: int, permutations: int, seed: int
) -> MeasureOptions:
    from layerbase.analysis.similarity.measures import MeasureOptions

    return MeasureOptions(preprocess, rbf_bandwidth, cca_dims, permutations, seed).check()


def _frame(rows: list[dict[str, Any]], columns: list[str]) -> pd.DataFrame:
    """Rows as a DataFrame; with no rows, an empty one that still has the usual columns."""
    import pandas as pd

    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=columns)


def _neighbors_frame(answer: Neighbors) -> pd.DataFrame:
    """Neighbours by rank (1 = nearest), with the lookup's description in ``.attrs``."""
    import pandas as pd

    frame = _frame(answer.rows, ["position", "text", "distance"])
    frame.index = pd.RangeIndex(1, len(frame) + 1, name="rank")
    frame.attrs.update(
        model=answer.model,
        layer=answer.layer,
        dataset=answer.dataset,
        query=answer.query,
        path=answer.path,
        only=answer.only.describe() or None,
    )
    return frame
