"""The representational-similarity measures of a layer pair, with their fixed definitions
(docs/measures.md) and the options every run stores with itself.

A measure is computed for all layer pairs of two models at once (``all_pairs``); this
module only names them, checks options and says which parameters a run of each stores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from layerbase.warehouse.errors import InputError
from layerbase.warehouse.models import AFFINITY_MEASURES, K_MEASURES


@dataclass(frozen=True)
class Measure:
    """What a measure is and how it is computed.

    ``family``: how all layer pairs are computed (``neighbours`` from k-NN sets, ``kernel``
    from one centered Gram matrix per layer, ``cca`` from each layer's top SVD directions,
    ``procrustes`` from the centered, normalized activations, ``rsa`` from each layer's ranked
    dissimilarities). ``null``: ``closed_form`` (under uniformly random neighbour sets) or
    ``permutation`` (model B's prompts shuffled)."""

    name: str
    label: str
    family: str
    symmetric: bool
    null: str
    parameters: tuple[str, ...]
    reference: str

    @property
    def uses_k(self) -> bool:
        return "k" in self.parameters


MEASURES: dict[str, Measure] = {
    m.name: m
    for m in (
        Measure(
            "mutual_knn",
            "mutual k-NN",
            "neighbours",
            True,
            "closed_form",
            ("k",),
            "Huh et al. 2024; Wolfram & Schein 2025",
        ),
        Measure("jaccard_knn", "Jaccard k-NN", "neighbours", True, "closed_form", ("k",), "mean Jaccard index"),
        # Not exactly symmetric: the mask of mutual neighbourhoods is not a symmetric matrix,
        # so the estimator's 1'K~L~1 differs from 1'L~K~1 (by about 1e-3 on small samples).
        Measure("cknna", "CKNNA", "neighbours", False, "permutation", ("k",), "Huh et al. 2024"),
        Measure("linear_cka", "linear CKA", "kernel", True, "permutation", (), "Kornblith et al. 2019"),
        Measure("unbiased_cka", "unbiased linear CKA", "kernel", True, "permutation", (), "Song et al. 2012"),
        Measure("rbf_cka", "RBF CKA", "kernel", True, "permutation", ("rbf_bandwidth",), "Kornblith et al. 2019"),
        Measure("svcca", "SVCCA", "cca", True, "permutation", ("cca_dims",), "Raghu et al. 2017"),
        Measure("pwcca", "PWCCA", "cca", False, "permutation", ("cca_dims",), "Morcos et al. 2018"),
        Measure("procrustes", "Procrustes similarity", "procrustes", True, "permutation", (), "Williams et al. 2021"),
        Measure("rsa", "RSA (Spearman)", "rsa", True, "permutation", (), "Kriegeskorte et al. 2008"),
    )
}
assert tuple(MEASURES) == AFFINITY_MEASURES, "the schema's list of measures (warehouse.models) must match"
assert tuple(m.name for m in MEASURES.values() if m.uses_k) == K_MEASURES
DEFAULT_MEASURE = "mutual_knn"
# none: the stored activations as they are (the papers' choice); center: each layer's mean
# prompt subtracted; clamp95: every coordinate clamped to +-q, q the mean over prompts of the
# 95th percentile of |x| in the prompt's row (platonic-rep's remove_outliers, per layer).
PREPROCESSING = ("none", "center", "clamp95")


@dataclass(frozen=True)
class MeasureOptions:
    """Options of a run; those a measure uses are stored with it (``parameters``)."""

    preprocess: str = "none"
    rbf_bandwidth: float = 1.0  # sigma as a fraction of the median pairwise distance
    cca_dims: int = 10  # SVD directions kept per layer before CCA
    permutations: int = 10  # of the permutation null; 0: no null level
    seed: int = 0  # of the permutations and of the bootstrap

    def check(self) -> MeasureOptions:
        if self.preprocess not in PREPROCESSING:
            raise InputError(f"unknown preprocessing {self.preprocess!r}; use one of {', '.join(PREPROCESSING)}")
        if not self.rbf_bandwidth > 0:
            raise InputError(f"--rbf-bandwidth must be positive (got {self.rbf_bandwidth})")
        if self.cca_dims < 1:
            raise InputError(f"--cca-dims must be at least 1 (got {self.cca_dims})")
        if not 0 <= self.permutations <= 10_000:
            raise InputError(f"--permutations must be between 0 and 10000 (got {self.permutations})")
        if not 0 <= self.seed < 2**63:
            raise InputError(f"--seed must be a non-negative integer (got {self.seed})")
        return self

    def parameters(self, measure: Measure, k: int | None) -> dict[str, Any]:
        """What a run of ``measure`` stores: every option it depends on, and its null level."""
        stored: dict[str, Any] = {"preprocess": self.preprocess}
        if measure.uses_k:
            stored["k"] = k
        if "rbf_bandwidth" in measure.parameters:
            stored["rbf_bandwidth"] = self.rbf_bandwidth
        if "cca_dims" in measure.parameters:
            stored["cca_dims"] = self.cca_dims
        if measure.null == "permutation":
            stored["permutations"] = self.permutations
            if self.permutations:
                stored["seed"] = self.seed
        return stored


def get_measure(name: str) -> Measure:
    try:
        return MEASURES[name]
    except KeyError:
        raise InputError(f"unknown measure {name!r}; use one of {', '.join(MEASURES)}") from None


def parse_measures(text: str | list[str] | tuple[str, ...]) -> list[Measure]:
    """Measures from 'a,b' or a list ('all': every one), each once, in the order given."""
    names = [p.strip() for p in text.split(",")] if isinstance(text, str) else list(text)
    names = [n for n in names if n]
    if names == ["all"]:
        names = list(MEASURES)
    if not names:
        raise InputError(f"give at least one measure: {', '.join(MEASURES)}")
    return [get_measure(n) for n in dict.fromkeys(names)]
