"""Figures for reports: affinity heatmaps (rectangular and relative-depth square), the
mean square matrix, on- vs off-diagonal means, within-model matrices and neighbour lists.

Every function returns a matplotlib Figure; ``save`` writes it as PNG. Figures are made
without pyplot, so that this module selects no backend and keeps no global figure
registry: in a notebook a returned Figure shows inline, and a script's figures are freed
when dropped.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any, Literal

import numpy as np
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from layerbase.analysis.similarity.stats import generalized_diagonal, max_similarity_path
from layerbase.warehouse.errors import InputError

CMAP = "viridis"
DPI = 110


def make_folder(path: Path) -> Path:
    """Create an output folder, or say why it cannot be."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(
            f"cannot create the folder {path}: {exc.strerror}; pass --out with a writable folder"
        ) from None
    return path


def save(fig: Figure, path: Path) -> Path:
    """Write a figure as PNG."""
    try:
        fig.savefig(path, dpi=DPI, bbox_inches="tight")
    except OSError as exc:
        raise InputError(f"cannot write the figure {path}: {exc.strerror}; pick a path in a writable folder") from None
    return path


def _subplots(
    *grid: int,
    figsize: tuple[float, float],
    layout: Literal["constrained", "tight"] | None = None,
    squeeze: bool = True,
) -> tuple[Figure, Any]:
    """pyplot.subplots without pyplot: a new Figure and its axes."""
    fig = Figure(figsize=figsize, layout=layout)
    return fig, fig.subplots(*grid, squeeze=squeeze)


def mask_outline(
    mask: np.ndarray, x0: float, y0: float, dx: float = 1.0, dy: float = 1.0, **style: Any
) -> LineCollection:
    """Line segments along the border of the True cells of a [row, col] mask.

    Cell (r, c) spans x in [x0 + c dx, x0 + (c + 1) dx] and y in [y0 + r dy, y0 + (r + 1) dy].
    """
    segments = []
    p = np.pad(mask, 1)  # p[r + 1, c + 1] is mask[r, c]; the border is False
    for r, c in zip(*np.nonzero(mask)):
        left, bottom = x0 + c * dx, y0 + r * dy
        if not p[r, c + 1]:  # below
            segments.append([(left, bottom), (left + dx, bottom)])
        if not p[r + 2, c + 1]:  # above
            segments.append([(left, bottom + dy), (left + dx, bottom + dy)])
        if not p[r + 1, c]:  # left
            segments.append([(left, bottom), (left, bottom + dy)])
        if not p[r + 1, c + 2]:  # right
            segments.append([(left + dx, bottom), (left + dx, bottom + dy)])
    return LineCollection(segments, **style)


def diagonal_mask_for(scores: np.ndarray) -> np.ndarray:
    """The generalized diagonal in the matrix's own orientation (rows may be the shallower model)."""
    if scores.shape[0] >= scores.shape[1]:
        return generalized_diagonal(*scores.shape)
    return generalized_diagonal(scores.shape[1], scores.shape[0]).T


def wrap_clauses(text: str, width: int) -> str:
    """``text`` in lines of at most ``width`` characters, broken only after a comma or a
    semicolon where it can be, so that "log10 p = -24.7" stays on one line (textwrap breaks at
    any space). A clause longer than a line is wrapped as textwrap would."""
    lines: list[str] = []
    for clause in re.split(r"(?<=[,;]) ", text):
        if lines and len(lines[-1]) + 1 + len(clause) <= width:
            lines[-1] += " " + clause
        else:
            lines.extend(textwrap.wrap(clause, width) or [""])
    return "\n".join(lines)


def heatmap_size(n_rows: int, n_cols: int) -> tuple[float, float]:
    """Figure size in inches for a layer x layer heatmap: cells of about 0.22 inch."""
    return max(6.0, 3.6 + 0.22 * n_cols), max(4.8, 2.6 + 0.22 * n_rows)


def affinity_heatmap(
    scores: np.ndarray,
    layers_a: list[int],
    layers_b: list[int],
    name_a: str,
    name_b: str,
    *,
    label: str = "mutual k-NN",
    k: int | None = None,
    chance: float | None = None,
    subtitle: str = "",
    diagonal: bool = True,
    path: bool = True,
    vmax: float | None = None,
) -> Figure:
    """Layer x layer heatmap: rows = model A's layers (bottom to top), columns = model B's.

    The generalized diagonal is outlined and the max-similarity path (best B layer for each
    A layer) is drawn. Top and right axes give relative depth.
    """
    n_a, n_b = len(layers_a), len(layers_b)
    fig, ax = _subplots(figsize=heatmap_size(n_a, n_b), layout="constrained")
    image = _draw_affinity(ax, scores, layers_a, layers_b, diagonal=diagonal, path=path, vmax=vmax)
    bar = fig.colorbar(image, ax=ax, pad=0.02)
    bar.set_label(
        label + (f", k = {k}" if k is not None else "") + (f"  (chance {chance:.3f})" if chance is not None else "")
    )
    ax.set_xlabel(f"{name_b} layer")
    ax.set_ylabel(f"{name_a} layer")
    n_layers_a, n_layers_b = max(layers_a), max(layers_b)
    top = ax.secondary_xaxis("top", functions=(lambda x: x / n_layers_b, lambda d: d * n_layers_b))
    top.set_xlabel(f"{name_b} relative depth")
    right = ax.secondary_yaxis("right", functions=(lambda y: y / n_layers_a, lambda d: d * n_layers_a))
    right.set_ylabel(f"{name_a} relative depth")
    title = f"{name_a} × {name_b}"
    if subtitle:
        title += "\n" + wrap_clauses(subtitle, width=int(10 * heatmap_size(n_a, n_b)[0]))
    ax.set_title(title, fontsize=9)
    return fig


def _draw_affinity(
    ax: Any,
    scores: np.ndarray,
    layers_a: list[int],
    layers_b: list[int],
    *,
    diagonal: bool = True,
    path: bool = True,
    vmax: float | None = None,
    legend: bool = True,
) -> Any:
    """The matrix on ``ax`` (rows = A's layers, bottom to top) with the generalized diagonal
    outlined and the max-similarity path; returns the image for a colour bar."""
    n_a, n_b = len(layers_a), len(layers_b)
    extent = (layers_b[0] - 0.5, layers_b[-1] + 0.5, layers_a[0] - 0.5, layers_a[-1] + 0.5)
    image = ax.imshow(
        scores,
        origin="lower",
        extent=extent,
        cmap=CMAP,
        aspect="auto",
        vmin=min(0.0, float(np.min(scores))),  # unbiased CKA and RSA can fall below 0
        vmax=vmax,
        interpolation="nearest",
    )
    if diagonal and n_a > 1 and n_b > 1:
        ax.add_collection(
            mask_outline(
                diagonal_mask_for(scores),
                layers_b[0] - 0.5,
                layers_a[0] - 0.5,
                colors="white",
                linewidths=1.2,
                linestyles="--",
            )
        )
    if path:
        best = max_similarity_path(scores)
        ax.plot(
            [layers_b[j] for j in best],
            layers_a,
            color="#ff5a36",
            marker="o",
            markersize=3.5,
            linewidth=1.2,
            label="max-similarity path",
        )
        if legend:
            ax.legend(loc="lower right", fontsize=7, framealpha=0.8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    return image


def measure_grid(
    panels: list[tuple[str, np.ndarray]], layers_a: list[int], layers_b: list[int], name_a: str, name_b: str, title: str
) -> Figure:
    """One layer pair's matrices under several measures side by side (``panels``: (caption,
    scores)), each on its own colour scale, with the diagonal and the path."""
    columns = min(4, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = _subplots(rows, columns, figsize=(4.1 * columns, 3.6 * rows + 0.6), layout="constrained", squeeze=False)
    for ax, (caption, scores) in zip(axes.flat, panels):
        image = _draw_affinity(ax, scores, layers_a, layers_b, legend=False)
        fig.colorbar(image, ax=ax, pad=0.02)
        ax.set_title(textwrap.fill(caption, 48), fontsize=8)
        ax.set_xlabel(f"{name_b} layer", fontsize=8)
        ax.set_ylabel(f"{name_a} layer", fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_axis_off()
    fig.suptitle(title, fontsize=10)
    return fig


def square_heatmap(
    square: np.ndarray,
    title: str,
    *,
    label: str = "mutual k-NN",
    vmax: float | None = None,
    name_a: str = "model A",
    name_b: str = "model B",
) -> Figure:
    """A matrix on a relative-depth grid (0..1 on both axes) with the y = x line and the path."""
    size = square.shape[0]
    fig, ax = _subplots(figsize=(5.4, 4.4))
    image = ax.imshow(
        square, origin="lower", extent=(0, 1, 0, 1), cmap=CMAP, vmin=0, vmax=vmax, interpolation="nearest"
    )
    fig.colorbar(image, ax=ax).set_label(label)
    ax.plot([0, 1], [0, 1], color="white", linestyle="--", linewidth=1, label="equal relative depth")
    centres = (np.arange(size) + 0.5) / size
    ax.plot(
        centres[max_similarity_path(square)],
        centres,
        color="#ff5a36",
        marker="o",
        markersize=2.5,
        linewidth=1,
        label="max-similarity path",
    )
    ax.set_xlabel(f"{name_b} relative depth")
    ax.set_ylabel(f"{name_a} relative depth")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=7, framealpha=0.8)
    return fig


def on_off_scatter(points: list[tuple[str, float, float]], chance: float | None = None) -> Figure:
    """One point per model pair: off-diagonal mean (x) vs on-diagonal mean (y)."""
    fig, ax = _subplots(figsize=(5.2, 4.6))
    xs = [p[1] for p in points]
    ys = [p[2] for p in points]
    top = max(xs + ys + [chance or 0]) * 1.15 or 1.0
    ax.plot([0, top], [0, top], color="grey", linestyle="--", linewidth=1, label="on = off")
    ax.scatter(xs, ys, color="#3b6fb6", zorder=3)
    for label, x, y in points:
        pair, _, dataset = label.partition(" @ ")
        text = pair + (f"\non {dataset}" if dataset else "")
        # The label goes on the side of the point with more room, so that it stays inside
        # the axes: points sit near the left (off-diagonal means near chance) and the top.
        right = x < top / 2
        ax.annotate(
            text,
            (x, y),
            textcoords="offset points",
            xytext=(6 if right else -6, -4 if y > top * 0.8 else 6),
            fontsize=6.5,
            ha="left" if right else "right",
            va="top" if y > top * 0.8 else "bottom",
        )
    if chance is not None:
        ax.axvline(chance, color="#ff5a36", linewidth=0.8, linestyle=":", label=f"chance {chance:.3f}")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("mean off-diagonal mutual k-NN")
    ax.set_ylabel("mean on-diagonal mutual k-NN")
    ax.set_title("Generalized diagonal vs the rest, per model pair", fontsize=10)
    ax.legend(loc="lower right", fontsize=7)
    return fig


def neighbour_lists(query: str, panels: list[tuple[str, list[tuple[int, str]], set[int]]]) -> Figure:
    """Side-by-side neighbour lists of one prompt; shared neighbours are highlighted.

    ``panels``: (title, [(position, text)], shared positions).
    """
    rows = max(len(p[1]) for p in panels)
    fig, axes = _subplots(1, len(panels), figsize=(5.6 * len(panels), 1.3 + 0.36 * rows))
    axes = np.atleast_1d(axes)
    fig.suptitle(textwrap.shorten("Prompt: " + query.replace("\n", " "), 150), fontsize=9, y=0.995)
    for ax, (title, items, shared) in zip(axes, panels):
        ax.set_axis_off()
        ax.set_title(title, fontsize=9)
        for i, (position, text) in enumerate(items):
            hit = position in shared
            ax.text(
                0.0,
                1 - (i + 0.8) / rows,
                f"{i + 1:>2}. [{position}] " + textwrap.shorten(text.replace("\n", " "), 60),
                fontsize=7.5,
                family="monospace",
                transform=ax.transAxes,
                color="#b3261e" if hit else "#222222",
                weight="bold" if hit else "normal",
            )
    fig.text(0.5, 0.005, "red, bold: in both neighbour sets", ha="center", fontsize=7, color="#b3261e")
    return fig


def model_matrix(matrix: np.ndarray, names: list[str], title: str, label: str = "Pearson r") -> Figure:
    """A symmetric model x model matrix with the values written in the cells."""
    size = len(names)
    fig, ax = _subplots(figsize=(1.6 + 1.1 * size, 1.2 + 0.9 * size))
    image = ax.imshow(matrix, cmap=CMAP, vmin=min(0.0, float(matrix.min())), vmax=1.0)
    fig.colorbar(image, ax=ax).set_label(label)
    ax.set_xticks(range(size), names, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(size), names, fontsize=8)
    for i in range(size):
        for j in range(size):
            ax.text(
                j,
                i,
                f"{matrix[i, j]:.3f}",
                ha="center",
                va="center",
                fontsize=8,
                color="black" if matrix[i, j] > 0.6 else "white",
            )
    ax.set_title(title, fontsize=10)
    return fig


def local_geometry(
    id_a: np.ndarray, id_b: np.ndarray, errors: dict[str, np.ndarray], name_a: str, name_b: str, title: str
) -> Figure:
    """Left: intrinsic dimension of each token in A vs B. Right: distributions of the
    relative reconstruction error of B's tokens under each choice of weights."""
    fig, (left, right) = _subplots(1, 2, figsize=(10.5, 4.3))
    rng = np.random.default_rng(0)
    jitter = lambda n: rng.uniform(-0.3, 0.3, n)  # noqa: E731 - integer IDs overlap without it
    left.scatter(id_a + jitter(len(id_a)), id_b + jitter(len(id_b)), s=4, alpha=0.35, color="#3b6fb6")
    top = max(id_a.max(), id_b.max()) + 1
    left.plot([0, top], [0, top], color="grey", linestyle="--", linewidth=1)
    left.set_xlabel(f"intrinsic dimension in {name_a}")
    left.set_ylabel(f"intrinsic dimension in {name_b}")
    left.set_title("Per-token intrinsic dimension", fontsize=9)
    bins = np.linspace(0, max(float(np.percentile(np.concatenate(list(errors.values())), 99.5)), 1e-6), 60)
    for (label, values), colour in zip(errors.items(), ["#2e7d32", "#3b6fb6", "#ff5a36", "#888888"]):
        right.hist(
            values,
            bins=bins,
            histtype="step",
            linewidth=1.4,
            color=colour,
            label=f"{label} (median {np.median(values):.3f})",
        )
    right.set_xlabel(f"relative error reconstructing {name_b}'s token")
    right.set_ylabel("tokens")
    right.set_title("LLE reconstruction in B", fontsize=9)
    right.set_ylim(top=right.get_ylim()[1] * 1.4)  # room for the legend above the bars
    right.legend(fontsize=7, loc="upper right")
    fig.suptitle(title, fontsize=10)
    return fig


def steering_sweep(rows: list[dict], title: str) -> Figure:
    """Mean log-odds shift against the coefficient: the vector, and the random controls'
    mean and range."""
    coefficients = np.array([r["coefficient"] for r in rows])
    fig, ax = _subplots(figsize=(6.2, 4.2))
    ax.axhline(0, color="grey", linewidth=0.8)
    shift = np.array([r["vector_shift"] for r in rows])
    sd = np.array([r["vector_sd"] for r in rows])
    ax.plot(coefficients, shift, marker="o", color="#b3261e", label="steering vector (± sd over prompts)")
    ax.fill_between(coefficients, shift - sd, shift + sd, color="#b3261e", alpha=0.12)
    if rows and rows[0]["random_mean"] is not None:
        ax.plot(
            coefficients,
            [r["random_mean"] for r in rows],
            marker="s",
            color="#555555",
            label="random vectors, same norm (mean, range)",
        )
        ax.fill_between(
            coefficients, [r["random_min"] for r in rows], [r["random_max"] for r in rows], color="#555555", alpha=0.15
        )
    ax.set_xlabel("coefficient")
    ax.set_ylabel("shift in log-odds, positive vs negative targets")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    return fig
