"""How a transferred steering vector's norm should be calibrated: each rule of
``layerbase steer transfer --calibrate`` measured on the packaged models, as the default was
chosen (issue: the old default, ``relative``, made Gemma's generations degenerate).

A sentiment vector is made from the preset contrast prompts at SmolLM2-135M layer 15 and
mapped into Gemma-3-270M layer 9 through the token-embedding map, once per rule. For each
vector, and for Gemma's own vector from the same prompts (the reference):

* steering: the shift of the log-odds of positive vs negative next words over the preset
  evaluation prompts at coefficients -1, +1 and +2, against random vectors of the same norm
  (``steer evaluate``);
* fluency: greedy continuations of a few prompts at -1, 0 and +1, scored by the unsteered
  model's mean negative log-likelihood per token (lower: more like the model's own text) and
  the share of distinct tokens (repetition loops score low).

\b
    python -m bench.steering_calibration                 # about 3 minutes on 2 cores
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import click

from bench.common import bench_warehouse, print_table, server_option

SOURCE, TARGET = "SmolLM2-135M-Instruct", "gemma-3-270m"
SOURCE_LAYER, TARGET_LAYER = 15, 9
PROMPTS = ("I think the movie was", "The food at the restaurant", "My week at the new job has been")
RULES = ("relative", "contrast", "none")


def fluency(lm: Any, prompt: str, continuation: str) -> tuple[float, float]:
    """(mean NLL per token of the continuation under the unsteered model, distinct-token share)."""
    import torch

    tok = lm.tokenizer
    head = tok(prompt, return_tensors="pt").input_ids
    full = tok(prompt + continuation, return_tensors="pt").input_ids.to(lm.device)
    with torch.no_grad():
        logits = lm.model(full).logits[0, :-1].float()
    targets = full[0, 1:]
    nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")[head.shape[1] - 1 :]
    new = targets[head.shape[1] - 1 :].tolist()
    return float(nll.mean()), len(set(new)) / max(1, len(new))


@click.command(help=__doc__)
@click.option("--max-new-tokens", type=int, default=30, show_default=True)
@server_option
def main(**options: Any) -> None:
    args = SimpleNamespace(**options)
    import numpy as np

    from layerbase.api import Layerbase
    from layerbase.ingest.loading import open_model

    with bench_warehouse(args.server) as wh:
        lb = Layerbase(wh, progress=False)
        for model in (SOURCE, TARGET):
            lb.export_embeddings(model)
        sides = ("preset:sentiment:positive", "preset:sentiment:negative")
        lb.make_steering_vector(SOURCE, SOURCE_LAYER, *sides, name="source")
        lb.make_steering_vector(TARGET, TARGET_LAYER, *sides, name="native")
        vectors = {"native (reference)": "native"}
        for rule in RULES:
            lb.transfer("source", to=TARGET, layer=TARGET_LAYER, calibrate=rule, name=f"by-{rule}")
            vectors[rule] = f"by-{rule}"
        lm = open_model(TARGET, progress=False)
        norms = lb.steering_vectors().set_index("name")["norm"]
        rows, samples = [], []
        for label, name in vectors.items():
            result = lb.evaluate_steering(name, coefficients=(-1.0, 1.0, 2.0), n_random=3)
            shift = {r["coefficient"]: r for r in result.summary()}
            scores: dict[float, list[tuple[float, float]]] = {-1.0: [], 0.0: [], 1.0: []}
            for prompt in PROMPTS:
                for coefficient in (-1.0, 1.0):
                    out = lb.generate(name, prompt, coefficient, max_new_tokens=args.max_new_tokens)
                    scores[coefficient].append(fluency(lm, prompt, out["steered"]))
                    if coefficient == 1.0:
                        scores[0.0].append(fluency(lm, prompt, out["unsteered"]))
                    if prompt == PROMPTS[0]:
                        samples.append((label, coefficient, out["unsteered"], out["steered"]))
            rows.append(
                {
                    "calibration": label,
                    "norm": round(float(norms[name]), 1),
                    "shift_-1": round(shift[-1.0]["vector_shift"], 2),
                    "shift_+1": round(shift[1.0]["vector_shift"], 2),
                    "shift_+2": round(shift[2.0]["vector_shift"], 2),
                    "random_+1": round(shift[1.0]["random_mean"], 2),
                    "nll_unsteered": round(float(np.mean([s[0] for s in scores[0.0]])), 2),
                    "nll_+1": round(float(np.mean([s[0] for s in scores[1.0]])), 2),
                    "nll_-1": round(float(np.mean([s[0] for s in scores[-1.0]])), 2),
                    "distinct_+1": round(float(np.mean([s[1] for s in scores[1.0]])), 2),
                }
            )
        print(f"{SOURCE} layer {SOURCE_LAYER} -> {TARGET} layer {TARGET_LAYER}, sentiment preset, token map:")
        print_table(rows, list(rows[0]))
        print(f"\ngreedy continuations of {PROMPTS[0]!r} ({args.max_new_tokens} tokens):")
        for label, coefficient, unsteered, steered in samples:
            if coefficient == 1.0:
                print(f"  {label:<20} unsteered: {unsteered.strip()[:110]!r}")
            print(f"  {label:<20} {coefficient:+.0f}: {steered.strip()[:110]!r}")


if __name__ == "__main__":
    main()
