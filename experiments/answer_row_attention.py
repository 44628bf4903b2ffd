"""Where the answer row of a trained STG_E model looks, layer by layer.

    python experiments/answer_row_attention.py MODEL_DIR [MODEL_DIR ...]

On the first 200 records of the seed-7 OOD validation set, prints per model the mean
attention mass (averaged over heads) that the row predicting the first answer token puts
on the three spurious values in each layer, and the mass the causal value tokens put on
spurious values that precede them in layer 1.
"""
import re, sys

import torch

from cattune import stg
from transformers import AutoModelForCausalLM, AutoTokenizer

torch.set_num_threads(1)
val = stg.generate("E", seed=7)["ood_test"][:200]
SPURIOUS, CAUSAL = stg.E_SPURIOUS, stg.E_CAUSAL

for d in sys.argv[1:]:
    m = AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager")
    tok = AutoTokenizer.from_pretrained(d)
    m.eval()
    acc = {}

    def add(k, v):
        acc.setdefault(k, []).append(v)

    for r in val:
        enc = tok(r.prompt, return_offsets_mapping=True)
        ids = torch.tensor([enc["input_ids"]])
        offs = enc["offset_mapping"]

        def value_tokens(name):
            s, e = re.search(rf"{name}: (\d+)", r.prompt).span(1)
            return [i for i, (a, b) in enumerate(offs) if a < e and b > s]

        with torch.no_grad():
            att = m(ids, output_attentions=True).attentions  # per layer [1, H, L, L]
        sp = [p for n in SPURIOUS for p in value_tokens(n)]
        q = ids.shape[1] - 1  # the row that predicts the first answer token
        for layer in range(len(att)):
            add(f"answer_row_layer{layer + 1}_on_spurious", float(att[layer][0, :, q, sp].mean(0).sum()))
        for n in CAUSAL:
            v = value_tokens(n)[-1]
            before = [c for c in sp if c < v]
            add("causal_values_layer1_on_spurious", float(att[0][0, :, v, before].mean(0).sum()) if before else 0.0)
    print(d, {k: round(sum(v) / len(v), 4) for k, v in acc.items()}, flush=True)
