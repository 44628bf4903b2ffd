"""Does a trained STG_E model answer from the causes or from the spurious items?

    python experiments/smollm2/spurious_reading.py MODEL [MODEL ...] [--split ood_test] [--seed 42]

In STG_E's training data the three spurious items are functions of the causes (Yellow
fingers = int(1.5 x Smoking), Clothing size = Weight, Hormones = int(0.5 x Exercise)), so a
model can read the label off either group. In the OOD sets they are drawn at random. This
script reads each OOD record's spurious items back as causes (Smoking = Yellow fingers /
1.5, Weight = Clothing size, Exercise = 2 x Hormones), takes the label they imply, and on
the records where it differs from the true label counts how often the model's greedy
answer is the true label and how often it is the spurious one (the model's accuracy on
the whole set is in the experiment's results). A model that reads the
spurious items follows them there; one that reads the causes does not.

MODEL: anything `cattune.models.load_model` takes (a directory saved by `cattune train`
or kept by an experiment; its cattune.json says whether to use the chat template).
"""

from __future__ import annotations

import argparse

import torch

from cattune import stg
from cattune.evaluate import generate_answers
from cattune.models import load_model
from cattune.reading import Reading, saved_reading


def spurious_label(variables: dict[str, int]) -> str:
    """The label the spurious items imply when read back through the IID rule."""
    score = 1.2 * variables["Yellow fingers"] / 1.5 + 0.7 * variables["Clothing size"] - 2 * variables["Hormones"]
    return "High Risk" if score > 7.2 else "Low Risk"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+")
    p.add_argument("--split", default="ood_test", help="an STG_E split (default: %(default)s)")
    p.add_argument("--seed", type=int, default=42, help="STG generation seed (42: the released files; 7: validation)")
    args = p.parse_args()
    torch.set_num_threads(2)
    records = stg.generate("E", seed=args.seed)[args.split]
    differ = [i for i, r in enumerate(records) if spurious_label(r.meta["variables"]) != r.target]
    print(f"STG_E {args.split} (seed {args.seed}): {len(records)} records, the spurious items imply "
          f"another label on {len(differ)}")
    print(f"{'model':60s} {'answers the true label':>23s} {'the spurious one':>17s}")
    for ref in args.models:
        chat = saved_reading(ref).chat_template
        model, tok = load_model(ref)
        model.eval()
        answers = generate_answers(model, tok, [records[i].prompt for i in differ], max_new_tokens=8,
                                   progress=False, reading=Reading(chat_template=chat))
        true = sum(a == records[i].target for a, i in zip(answers, differ)) / len(differ)
        spur = sum(a == spurious_label(records[i].meta["variables"]) for a, i in zip(answers, differ)) / len(differ)
        print(f"{ref[-60:]:60s} {100 * true:23.1f} {100 * spur:17.1f}", flush=True)


if __name__ == "__main__":
    main()
