"""Where the answer row of a trained STG model looks, layer by layer (any model).

    python experiments/smollm2/answer_row_layers.py MODEL [MODEL ...] [--task E] [--records 100]

MODEL: anything `cattune.models.load_model` takes (a directory saved by `cattune train`,
whose cattune.json says whether it was trained through the chat template, or
builtin:smollm2-135m-instruct for the untrained model). On the first records of the
seed-7 OOD validation set, prints per layer the attention mass (averaged over heads) that
the row predicting the first answer token puts on the causal values, the spurious values
and the unrelated values (the value tokens of "Smoking: 8" or "Coal Dependency: 31.6%",
as the loss's last_word columns), and the layer-averaged shares. ``--task H`` reads STG_H:
six causes, five spurious and three irrelevant items.
"""

from __future__ import annotations

import argparse
import re

import torch

from cattune import stg
from cattune.masks import render_prompt
from cattune.models import load_model
from cattune.reading import saved_reading

GROUPS = {
    "E": {"causal": stg.E_CAUSAL, "spurious": stg.E_SPURIOUS, "unrelated": stg.E_UNRELATED},
    "H": {
        "causal": tuple(name for name, _ in stg.H_CAUSAL),
        "spurious": tuple(name for name, _ in stg.H_SPURIOUS),
        "unrelated": tuple(name for name, _ in stg.H_IRRELEVANT),
    },
}


def value_tokens(text: str, offsets, name: str) -> list[int]:
    m = re.search(rf"{re.escape(name)}: (-?\d+(?:\.\d+)?%?)", text)
    if m is None:
        return []
    s, e = m.span(1)
    return [i for i, (a, b) in enumerate(offsets) if a < e and b > s]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+")
    p.add_argument("--task", choices=sorted(GROUPS), default="E", help="STG_E or STG_H (default: %(default)s)")
    p.add_argument("--records", type=int, default=100)
    args = p.parse_args()
    torch.set_num_threads(2)
    groups = GROUPS[args.task]
    val = stg.generate(args.task, seed=7, annotate=False)["ood_test"][: args.records]
    for ref in args.models:
        chat = saved_reading(ref).chat_template
        model, tok = load_model(ref)
        model.set_attn_implementation("eager")
        model.eval()
        mass: dict[str, list[list[float]]] = {g: [] for g in groups}
        for r in val:
            text = render_prompt(tok, r.prompt, chat)
            enc = tok(text, add_special_tokens=not chat, return_offsets_mapping=True)
            ids = torch.tensor([enc["input_ids"]])
            with torch.no_grad():
                att = model(input_ids=ids, output_attentions=True, use_cache=False).attentions
            q = ids.shape[1] - 1  # the row that predicts the first answer token
            for group, names in groups.items():
                cols = [c for n in names for c in value_tokens(text, enc["offset_mapping"], n)]
                mass[group].append([float(a[0, :, q, cols].mean(0).sum()) for a in att])
        print(f"{ref} (chat_template={chat}, {len(val)} STG_{args.task} OOD validation records)")
        layers = len(mass["causal"][0])
        print("layer " + " ".join(f"{g:>9}" for g in groups))
        for layer in range(layers):
            row = [sum(m[layer] for m in mass[g]) / len(val) for g in groups]
            print(f"{layer:5d} " + " ".join(f"{x:9.4f}" for x in row))
        avg = [sum(sum(m) for m in mass[g]) / len(val) / layers for g in groups]
        print("mean  " + " ".join(f"{x:9.4f}" for x in avg), flush=True)


if __name__ == "__main__":
    main()
