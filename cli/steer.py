"""``layerbase steer``: make, import, list, generate, transfer (Emb2Emb) and evaluate
steering vectors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from layerbase.cli.common import TEXT, Context, device_option, emit, json_option, plot_option, records, table
from layerbase.warehouse.errors import InputError

if TYPE_CHECKING:
    from layerbase.analysis.steering.vectors import VectorInfo

F = TypeVar("F", bound=Callable[..., Any])

file_type = click.Path(exists=True, dir_okay=False, path_type=Path)


@click.group()
def steer() -> None:
    """Steering vectors: make them, add them during generation, move them between models."""


def _side(name: str) -> Callable[[F], F]:
    def decorate(f: F) -> F:
        f = click.option(f"--{name}-preset", help=f"Built-in {name} prompts, e.g. sentiment:{name}.")(f)
        f = click.option(f"--{name}-file", type=file_type, help=f"File of {name} prompts, one per line.")(f)
        f = click.option(f"--{name}", f"{name}_dataset", help=f"Stored dataset of {name} prompts.")(f)
        return f

    return decorate


def _vector_text(info: VectorInfo) -> str:
    reference = f"median activation norm {info.activation_norm:.4g}" if info.activation_norm else "no activation norm"
    return (
        f"stored steering vector {info.name!r}: {info.model} layer {info.layer}, {info.method}, "
        f"token rule {info.token_rule}, norm {info.norm:.4g} ({reference}); "
        f"{info.n_positive} positive / {info.n_negative} negative prompts, from {info.source}"
    )


@steer.command("make")
@click.option("--model", "model", required=True, help="Stored model name.")
@click.option("--layer", type=int, required=True, help="Decoder block whose output the vector is added to.")
@_side("positive")
@_side("negative")
@click.option("--preset", help="Both sides from one built-in set, e.g. sentiment.")
@click.option(
    "--token-rule",
    type=click.Choice(["last", "mean"]),
    default="last",
    show_default=True,
    help="Average the last token's state, or the mean over tokens, of each prompt.",
)
@click.option("--name", required=True, help="Name of the new vector (vectors are immutable).")
@click.option("--batch-size", type=int, default=16, show_default=True)
@device_option
@json_option
@click.pass_obj
def make(
    obj: Context,
    model: str,
    layer: int,
    positive_dataset: str | None,
    positive_file: Path | None,
    positive_preset: str | None,
    negative_dataset: str | None,
    negative_file: Path | None,
    negative_preset: str | None,
    preset: str | None,
    token_rule: str,
    name: str,
    batch_size: int,
    device: str | None,
    as_json: bool,
) -> None:
    """Mean difference of activations between positive and negative prompts at a layer.

    Stored datasets that the model has ingested with the same pooling are read from the
    warehouse; other prompts are run through the model.
    """
    if preset:
        positive_preset, negative_preset = (
            positive_preset or f"{preset}:positive",
            negative_preset or f"{preset}:negative",
        )
    pos = _prompts(positive_dataset, positive_file, positive_preset, "positive prompts")
    neg = _prompts(negative_dataset, negative_file, negative_preset, "negative prompts")
    info = obj.api().make_steering_vector(
        model, layer, pos, neg, name=name, token_rule=token_rule, device=device, batch_size=batch_size
    )
    emit(info.as_dict(), as_json, _vector_text(info))


@steer.command("import")
@click.option("--model", "model", required=True, help="Stored model name.")
@click.option("--layer", type=int, required=True)
@click.option("--file", "path", type=file_type, required=True, help=".npy or .pt file holding one vector.")
@click.option("--token-rule", type=click.Choice(["last", "mean"]), default="last", show_default=True)
@click.option("--name", required=True)
@json_option
@click.pass_obj
def import_(obj: Context, model: str, layer: int, path: Path, token_rule: str, name: str, as_json: bool) -> None:
    """Store a vector you made elsewhere (a .npy or .pt file) for a model and layer."""
    info = obj.api().import_steering_vector(model, layer, path, name=name, token_rule=token_rule)
    emit(info.as_dict(), as_json, _vector_text(info))


@steer.command("list")
@json_option
@click.pass_obj
def list_(obj: Context, as_json: bool) -> None:
    """Stored steering vectors."""
    rows = records(obj.api().steering_vectors())
    emit(
        rows,
        as_json,
        table(rows, ["name", "model", "layer", "method", "token_rule", "norm", "activation_norm", "from"]),
    )


@steer.command("compare")
@click.argument("first")
@click.argument("second")
@json_option
@click.pass_obj
def compare(obj: Context, first: str, second: str, as_json: bool) -> None:
    """Cosine similarity of two stored vectors of one model (e.g. a transferred and a native one)."""
    cosine = obj.api().compare_vectors(first, second)
    emit({"first": first, "second": second, "cosine": cosine}, as_json, f"cosine({first}, {second}) = {cosine:+.4f}")


@steer.command("generate")
@click.argument("vector")
@click.option("--prompt", type=TEXT, required=True, help="Text to continue.")
@click.option("--coefficient", type=float, default=1.0, show_default=True, help="Multiplier of the vector.")
@click.option(
    "--both-signs/--one-sign",
    default=True,
    show_default=True,
    help="Also continue with the vector subtracted (-coefficient), as the sign is half the evidence.",
)
@click.option("--max-new-tokens", type=int, default=40, show_default=True)
@click.option("--sample", is_flag=True, help="Sample instead of greedy decoding.")
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--model", "model", help="Run another stored model of the same width (default: the vector's).")
@click.option("--layer", type=int, help="Add at another layer (default: the vector's).")
@device_option
@json_option
@click.pass_obj
def generate_(
    obj: Context,
    vector: str,
    prompt: str,
    coefficient: float,
    both_signs: bool,
    max_new_tokens: int,
    sample: bool,
    temperature: float,
    seed: int,
    model: str | None,
    layer: int | None,
    device: str | None,
    as_json: bool,
) -> None:
    """Continue a prompt unsteered, with the vector added to the residual stream, and (by
    default) with it subtracted."""
    lb = obj.api()

    def run(c: float) -> dict:
        return lb.generate(
            vector,
            prompt,
            c,
            max_new_tokens=max_new_tokens,
            sample=sample,
            seed=seed,
            temperature=temperature,
            model=model,
            layer=layer,
            device=device,
        )

    out = run(coefficient)
    lines = [
        f"{out['model']} layer {out['layer']}, {out['decoding']} decoding",
        f"prompt:              {prompt}",
        f"unsteered:           {out['unsteered']}",
        f"steered ({coefficient:+g} x {vector}): {out['steered']}",
    ]
    if both_signs and coefficient != 0:
        opposite = run(-coefficient)
        out["opposite"] = {"coefficient": -coefficient, "steered": opposite["steered"]}
        lines.append(f"steered ({-coefficient:+g} x {vector}): {opposite['steered']}")
    emit(out, as_json, "\n".join(lines))


@steer.command("transfer")
@click.argument("vector")
@click.option("--to", "target", required=True, help="Stored model to map the vector into.")
@click.option(
    "--layer",
    type=int,
    help="Target layer (default: the max-similarity path of a stored affinity "
    "matrix of the pair, else the same relative depth).",
)
@click.option(
    "--pairs",
    type=click.Choice(["tokens-input", "tokens-output", "prompts"]),
    default="tokens-input",
    show_default=True,
    help="Fit on shared-vocabulary token (un)embeddings, or on stored hidden states "
    "of the same prompts at the two layers.",
)
@click.option(
    "--dataset",
    help="For --pairs prompts: a dataset both models have ingested (also picks the affinity "
    "matrix whose max-similarity path chooses the layer).",
)
@click.option("--bias/--no-bias", default=True, show_default=True, help="Fit an affine map.")
@click.option("--ridge", type=float, default=0.0, show_default=True, help="Ridge penalty on the map.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the train / held-out split.")
@click.option(
    "--calibrate",
    default="contrast",
    show_default=True,
    help="contrast: the norm of the target model's own vector from the same contrast prompts; "
    "relative: keep the vector's norm relative to the layer's activation norm (large, and "
    "generations can degenerate); none; or native:VECTOR to match a native vector's norm.",
)
@click.option("--name", help="Name of the new vector (default: VECTOR->MODEL).")
@device_option
@json_option
@click.pass_obj
def transfer_(
    obj: Context,
    vector: str,
    target: str,
    layer: int | None,
    pairs: str,
    dataset: str | None,
    bias: bool,
    ridge: float,
    seed: int,
    calibrate: str,
    name: str | None,
    device: str | None,
    as_json: bool,
) -> None:
    """Map a steering vector into another model through a least-squares Emb2Emb map."""
    moved = obj.api().transfer(
        vector,
        to=target,
        layer=layer,
        pairs=pairs,
        dataset=dataset,
        bias=bias,
        ridge=ridge,
        seed=seed,
        calibrate=calibrate,
        name=name,
        device=device,
    )
    info, map_info, calibration = moved.vector, moved.map, moved.calibration
    if as_json:
        emit({"vector": info.as_dict(), "map": map_info.as_dict(), "calibration": calibration}, True)
        return
    m = map_info
    click.echo(
        f"map {m.id} {m.model_a} -> {m.model_b} on {m.pairs} ({'reused' if m.reused else 'fitted'}): "
        f"{m.n_train} train / {m.n_test} held-out pairs, bias {m.bias}, ridge {m.ridge:g}; "
        f"held-out R^2 {m.r2_test:.4f} (train {m.r2_train:.4f}), held-out cosine {m.cosine_test:.4f}"
    )
    click.echo(
        f"layer {info.layer} ({calibration['layer_rule']}); calibration {calibration['rule']}: "
        f"mapped norm {calibration['mapped_norm']:.4g} scaled by {calibration['scale']:.4g}"
    )
    click.echo(_vector_text(info))


@steer.command("evaluate")
@click.argument("vector")
@click.option("--prompts", "prompts_dataset", help="Stored dataset of evaluation prompts.")
@click.option("--prompts-file", type=file_type, help="File of evaluation prompts, one per line.")
@click.option(
    "--positive-words",
    type=TEXT,
    help="Comma-separated target words (default: sentiment words; a leading space is kept, as in ' good').",
)
@click.option("--negative-words", type=TEXT, help="Comma-separated target words on the other side.")
@click.option("--coefficients", default="-2,-1,-0.5,0.5,1,2", show_default=True, help="Coefficients swept.")
@click.option(
    "--random", "n_random", type=int, default=3, show_default=True, help="Random vectors of the same norm as controls."
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True)
@plot_option
@device_option
@click.option("--progress/--no-progress", default=True, help="Show a progress bar over the forward passes.")
@json_option
@click.pass_obj
def evaluate_(
    obj: Context,
    vector: str,
    prompts_dataset: str | None,
    prompts_file: Path | None,
    positive_words: str | None,
    negative_words: str | None,
    coefficients: str,
    n_random: int,
    seed: int,
    batch_size: int,
    plot: Path | None,
    device: str | None,
    progress: bool,
    as_json: bool,
) -> None:
    """Shift of target-token log-odds over a prompt set, per coefficient, vs random vectors."""
    from layerbase.analysis.steering.vectors import parse_coefficients

    preset = "evaluation" if prompts_dataset is None and prompts_file is None else None
    prompts = _prompts(prompts_dataset, prompts_file, preset, "evaluation prompts")
    result = obj.api().evaluate_steering(
        vector,
        prompts,
        positive_words=_words(positive_words),
        negative_words=_words(negative_words),
        coefficients=parse_coefficients(coefficients),
        n_random=n_random,
        seed=seed,
        batch_size=batch_size,
        device=device,
        progress=progress,
    )
    summary = result.summary()
    if plot is not None:
        from layerbase.analysis.reporting.plots import save, steering_sweep

        save(
            steering_sweep(summary, f"{vector} in {result.model} layer {result.layer}: {result.n_prompts} prompts"),
            plot,
        )
    if as_json:
        emit(result.as_dict() | {"summary": summary}, True)
        return
    click.echo(
        f"evaluation {result.id}: {vector} in {result.model} layer {result.layer}, {result.n_prompts} prompts "
        f"({result.prompts_label}); unsteered log-odds positive vs negative {result.baseline_logodds:+.3f}"
    )
    rows = [
        {
            "coefficient": f"{r['coefficient']:+g}",
            "vector_shift": f"{r['vector_shift']:+.3f}",
            "sd": f"{r['vector_sd']:.3f}",
            "random_mean": "" if r["random_mean"] is None else f"{r['random_mean']:+.3f}",
            "random_range": "" if r["random_min"] is None else f"{r['random_min']:+.3f} .. {r['random_max']:+.3f}",
        }
        for r in summary
    ]
    click.echo(table(rows, ["coefficient", "vector_shift", "sd", "random_mean", "random_range"]))
    if plot is not None:
        click.echo(f"figure: {plot}")


def _prompts(dataset: str | None, file: Path | None, preset: str | None, what: str) -> str | Path:
    """Exactly one of a stored dataset, a file or a preset, as the API takes a prompt set."""
    given = [x for x in (dataset, file, f"preset:{preset}" if preset else None) if x is not None]
    if len(given) != 1:
        raise InputError(f"give the {what} as exactly one of a stored dataset, a file or a preset")
    return given[0]


def _words(text: str | None) -> list[str] | None:
    if text is None:
        return None
    words = [w for w in text.split(",") if w.strip()]
    return words or None
