"""How widely an indexed engine searches (ef_search or probes, and candidates), how that is
widened until a sample's recall reaches the target, and lookup calibration."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from psycopg import sql

from layerbase.analysis.knn.index import EF_SEARCH_LIMIT, USE_INDEX, IndexPlan, ef_search_for, ivfflat_lists

# Recall is measured as recall@10 (or @k_max where that is smaller).
RECALL_K = 10

# A tuning step costs 200 sample queries, 2 % of a 10000-prompt run, while a setting wider
# than needed costs every query of the run and every later lookup: ef_search grows by
# half a step rather than doubling (from 22, doubling tuned lookups at n = 100000 to 88
# where 44 fell just short, 5.0 ms a lookup). IVFFlat's probes still double: from lists/20
# the steps are few and coarse either way.
EF_SEARCH_GROWTH = 1.5


@dataclass(frozen=True)
class Search:
    """How widely an indexed engine searches: ``breadth`` is hnsw.ef_search or ivfflat.probes
    (at most ``limit``), and each query takes ``candidates`` rows from the index (self
    included) before the exact re-rank."""

    method: str
    breadth: int
    limit: int
    candidates: int

    def settings(self) -> list[sql.Composable]:
        """The statements that make a transaction search this way, through the index."""
        name = "hnsw.ef_search" if self.method == "hnsw" else "ivfflat.probes"
        return [sql.SQL("SET LOCAL {} = {}").format(sql.SQL(name), sql.Literal(self.breadth)), *USE_INDEX]

    def wider(self, rough_order: bool, n: int) -> Search | None:
        """The next setting to try: the next breadth (``next_breadth``), and for an index
        that orders only roughly (a prefix) twice the candidates; None when nothing can grow."""
        # An HNSW scan returns at most ef_search rows, so more candidates than that are moot.
        # Each candidate costs a row fetch and its distances (9 us at width 2048, pgvector
        # 0.8.5), so they grow only where the index order is the cause of missed neighbours.
        cap = min(n, self.limit) if self.method == "hnsw" else n
        candidates = min(cap, self.candidates * 2) if rough_order else self.candidates
        breadth = min(self.limit, max(self.next_breadth(), candidates if self.method == "hnsw" else 0))
        if (breadth, candidates) == (self.breadth, self.candidates):
            return None
        return replace(self, breadth=breadth, candidates=candidates)

    def next_breadth(self) -> int:
        """ef_search grows by half (``EF_SEARCH_GROWTH``), probes double."""
        return math.ceil(self.breadth * EF_SEARCH_GROWTH) if self.method == "hnsw" else self.breadth * 2

    def as_dict(self) -> dict:
        key = "ef_search" if self.method == "hnsw" else "probes"
        return {key: self.breadth, "candidates": self.candidates}


def initial_search(plan: IndexPlan, k: int, n: int, asked: int | None, lists: int | None = None) -> Search:
    """The narrowest search worth trying: k + 1 candidates (twice that for a reduced index),
    ef_search as ``ef_search_for`` gives it (2(k + 1) unless asked), or probes = lists / 20
    (``lists``: the IVFFlat index's, by default ``ivfflat_lists(n)``).

    HNSW starts below pgvector's default ef_search of 40: the recall tuning widens it where
    needed, and where 22 reaches the recall asked for k = 10 it saves a third of the
    search (measured on 10000 activation-like vectors of width 576: 22 gave a sample recall
    bound of 0.993-0.996, and the whole run took 4.2 s instead of 5.0 s on pgvector 0.6.2,
    3.2-3.3 s instead of 3.8-3.9 s on 0.8.5)."""
    candidates = min(n, (k + 1) * (2 if plan.reduced else 1))
    if plan.method == "hnsw":
        breadth = min(EF_SEARCH_LIMIT, max(candidates, ef_search_for(k, asked)))
        return Search(plan.method, breadth, EF_SEARCH_LIMIT, candidates)
    lists = lists or ivfflat_lists(n)
    return Search(plan.method, min(lists, asked or max(1, lists // 20)), lists, candidates)


def describe_search(search: dict | None) -> str:
    """A stored search record in a few words: the index's build parameters and the search,
    e.g. 'm 16, ef_construction 64, ef_search 22, candidates 11'."""
    keys = ("m", "ef_construction", "lists", "probes", "ef_search", "candidates")
    shown = search or {}
    return ", ".join(f"{key} {shown[key]}" for key in keys if key in shown)


# A setting is accepted when the sample's recall is at least the target with 95 %
# confidence (one-sided normal bound), not just on average: the smallest setting whose
# sample mean passes tends to fall short on the other prompts (measured on activation-like
# data: IVFFlat at 10 probes, 0.990 on the sample and 0.985 on all 10000 prompts).
RECALL_CONFIDENCE_Z = 1.645


@dataclass(frozen=True)
class SampleRecall:
    """recall@k on the tuning sample: the mean over its prompts and a lower confidence bound."""

    mean: float
    low: float

    @classmethod
    def of(cls, per_prompt: list[float]) -> SampleRecall:
        values = np.asarray(per_prompt, dtype=np.float64)
        se = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else 0.0
        return cls(float(values.mean()), float(values.mean() - RECALL_CONFIDENCE_Z * se))

    def reaches(self, target: float) -> bool:
        return self.low >= target

    def as_dict(self) -> dict:
        return {"recall": round(self.mean, 4), "recall_low": round(self.low, 4)}


def calibrate_lookups(
    plan: IndexPlan,
    tuned: Search,
    k: int,
    n: int,
    queries: int,
    min_recall: float,
    recall_of: Callable[[Search], SampleRecall],
) -> dict:
    """The smallest ef_search (from ``ef_search_for(k)``, widening as ``Search.wider``) whose
    lookups of k neighbours reach ``min_recall`` on the sample; ``layerbase neighbors`` uses
    it for this layer. The k-NN run's own setting is tuned for its K_max, which needs a
    wider search than a lookup of 10 (measured at n = 100000: 5.5 ms a lookup at ef_search
    200, 4.7 ms at 75 with recall@10 0.998). At most the k-NN run's ef_search, whose recall
    is known, or the lookup's own candidates where those are more."""
    candidates = plan.lookup_candidates(k)
    start = max(min(ef_search_for(k), tuned.breadth), candidates)
    search: Search | None = Search("hnsw", start, max(tuned.breadth, candidates), candidates)
    tried = []
    while search is not None:
        recall = recall_of(search)
        tried.append({"ef_search": search.breadth, **recall.as_dict()})
        if recall.reaches(min_recall):
            break
        search = search.wider(rough_order=False, n=n)  # a lookup's candidates stay as they are
    return {**tried[-1], "queries": queries, "k": k, "tried": tried}
