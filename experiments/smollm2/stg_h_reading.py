"""Does a trained STG_H model's answer move when only the spurious items change?

    python experiments/smollm2/stg_h_reading.py MODEL [MODEL ...] [--split ood_test] [--seed 42] [--limit 400]

In STG_H's training data the five spurious items are noisy functions of five of the six
causes (Ice Cream Sales = 0.4 x Meteorological Dispersion, Allergy Complaints = 0.2 x
Agricultural Burning, Renewable Stock = 1.1 x Industrial Emissions, Public Transport =
0.15 x Vehicle Emissions, Water Awareness = -0.1 x Urban Green Coverage, each plus noise);
in the OOD sets they are drawn at random. This script answers each record twice: as it
is, and with its spurious items replaced by the values the training rule gives for its
own causes (without the noise). The causes, and so the index, are the same in both. A
model that computes the index from the causes gives the same answer to both; one that
reads the spurious items moves. It prints, per model, the mean absolute error against the
index on each version, how often the answer changes, and the mean |change|.

MODEL: anything `cattune.models.load_model` takes (a directory saved by `cattune train`
or kept by an experiment; its cattune.json says whether to use the chat template).
"""

from __future__ import annotations

import argparse
import re
import statistics
from math import nan

import torch

from cattune import stg
from cattune.checkers import numeric_error, parse_number
from cattune.evaluate import generate_answers
from cattune.models import load_model
from cattune.reading import Reading, saved_reading

# spurious item -> (the cause it copies in the training data, the factor)
IID_RULE = {
    "Ice Cream Sales Index": ("Meteorological Dispersion", 0.4),
    "Allergy Complaints Level": ("Agricultural Burning", 0.2),
    "Renewable Stock Index": ("Industrial Emissions", 1.1),
    "Public Transport Subscriptions (k)": ("Vehicle Emissions", 0.15),
    "Water Awareness Score": ("Urban Green Coverage", -0.1),
}


def causes(prompt: str) -> dict[str, float]:
    """The six causal values as the prompt prints them."""
    return {name: float(re.search(rf"{re.escape(name)}: (-?\d+\.\d)", prompt).group(1)) for name, _ in stg.H_CAUSAL}


def with_iid_spurious(prompt: str) -> str:
    """The prompt with its spurious items set by the training rule from its own causes."""
    c = causes(prompt)
    items = "; ".join(f"{name}: {fmt.format(IID_RULE[name][1] * c[IID_RULE[name][0]])}" for name, fmt in stg.H_SPURIOUS)
    first, last = stg.H_SPURIOUS[0][0], stg.H_SPURIOUS[-1][0]
    pattern = rf"{re.escape(first)}: .*?{re.escape(last)}: -?\d+(?:\.\d+)?"
    out, n = re.subn(pattern, lambda _: items, prompt, count=1)
    if n != 1:
        raise ValueError(f"no spurious items found in: {prompt[:80]}...")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+")
    p.add_argument("--split", default="ood_test", help="an STG_H split (default: %(default)s)")
    p.add_argument("--seed", type=int, default=42, help="STG generation seed (42: the released files; 7: validation)")
    p.add_argument("--limit", type=int, default=400, help="the first N records of the split (default: %(default)s)")
    args = p.parse_args()
    torch.set_num_threads(2)
    records = stg.generate("H", seed=args.seed, annotate=False)[args.split][: args.limit]
    targets = [r.target for r in records]
    as_is = [r.prompt for r in records]
    rule = [with_iid_spurious(r.prompt) for r in records]
    print(f"STG_H {args.split} (seed {args.seed}): {len(records)} records, each as is and with its spurious "
          f"items set by the training rule")
    print(f"{'model':50s} {'MAE as is':>10s} {'MAE rule':>9s} {'answer changes %':>17s} {'mean |change|':>14s}")
    for ref in args.models:
        chat = saved_reading(ref).chat_template
        model, tok = load_model(ref)
        model.eval()
        a = generate_answers(model, tok, as_is, max_new_tokens=6, progress=False, reading=Reading(chat_template=chat))
        b = generate_answers(model, tok, rule, max_new_tokens=6, progress=False, reading=Reading(chat_template=chat))
        pairs = list(zip(map(parse_number, a), map(parse_number, b)))
        moves = [abs(x - y) for x, y in pairs if x is not None and y is not None]
        changed = sum(x != y for x, y in pairs) / len(pairs)  # by value: "40" and "40." are the same answer
        mae_a, mae_b = (nan if (e := numeric_error(targets, x)[0]) is None else e for x in (a, b))
        print(f"{ref[-50:]:50s} {mae_a:10.2f} {mae_b:9.2f} "
              f"{100 * changed:17.1f} {statistics.fmean(moves) if moves else nan:14.2f}", flush=True)


if __name__ == "__main__":
    main()
