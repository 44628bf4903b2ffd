"""Where does a trained STG_E model's out-of-distribution error come from?

    python experiments/ood_interventions.py MODEL_DIR [MODEL_DIR ...]

Evaluates each model on the seed-7 OOD *validation* set three ways and prints one JSON
line per model:

- ``ood``: as generated (spurious items independent of the causes);
- ``spurious_repaired``: the same records with the three spurious values rewritten by
  their IID rule (Yellow fingers = int(1.5 Smoking), Clothing size = Weight, Hormones =
  int(0.5 Exercise)), so the context looks like training again;
- ``unrelated_redrawn``: the two unrelated values drawn again (a control: they carry
  nothing in either distribution).

The answer only depends on Smoking, Weight and Exercise, which none of the rewrites
touch. A model that reads nothing but the causes scores the same on all three.
"""
import argparse, json, random, re
from dataclasses import replace

import torch

from cattune import stg
from cattune.models import load_model
from cattune.evaluate import evaluate


def values(prompt: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"([A-Z][a-z]+(?: [a-z]+)?): (\d+)", prompt)}


def rewrite(prompt: str, name: str, value: int) -> str:
    return re.sub(rf"{name}: \d+", f"{name}: {value}", prompt)


def spurious_repaired(record):
    v, p = values(record.prompt), record.prompt
    for name, value in zip(stg.E_SPURIOUS, stg.e_spurious_iid(*(v[c] for c in stg.E_CAUSAL))):
        p = rewrite(p, name, value)
    return replace(record, prompt=p)


def unrelated_redrawn(record, rng):
    p = record.prompt
    for name in stg.E_UNRELATED:
        p = rewrite(p, name, rng.randint(1, 10))
    return replace(record, prompt=p)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    val = stg.generate("E", seed=7)["ood_test"]
    rng = random.Random(0)
    sets = {"ood": val, "spurious_repaired": [spurious_repaired(r) for r in val],
            "unrelated_redrawn": [unrelated_redrawn(r, rng) for r in val]}
    for path in a.models:
        model, tok = load_model(path)
        out = {"model": path}
        for name, records in sets.items():
            out[name] = evaluate(model, tok, records, progress=False).accuracy
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
