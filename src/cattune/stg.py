"""The Spurious Token Game (STG): synthetic data whose causal graph is known.

STG_E ("easy"): cancer risk from Smoking/Weight/Exercise; three spurious items copy the
causes in the IID splits and are drawn independently in the OOD split.
STG_H ("hard"): an integer air-quality index from six causes, five spurious and three
irrelevant items. Definitions: docs/method.md section 5. Annotations are written by the
programmatic annotator (``cattune.annotate.RuleAnnotator``), the same mechanism users
get with ``cattune annotate --rule``.
"""

from __future__ import annotations

import random

import numpy as np

from .records import Record

E_PREFIX = "Here is the statistical data for a person. Please predict the probability of cancer. "
E_CAUSAL = ("Smoking", "Weight", "Exercise")
E_SPURIOUS = ("Yellow fingers", "Clothing size", "Hormones")
E_UNRELATED = ("Certain gene", "Room size")
# The rule the programmatic annotator applies to STG_E: the label attends to the
# "Name: value" item of each cause, in prompt order.
E_RULE = {"key": "{target}", "values": [rf"\b{name}: \d+" for name in E_CAUSAL]}


H_CAUSAL = (
    ("Industrial Emissions", "{:.1f}"),
    ("Vehicle Emissions", "{:.1f}"),
    ("Coal Dependency", "{:.1f}%"),
    ("Agricultural Burning", "{:.1f}"),
    ("Urban Green Coverage", "{:.1f}%"),
    ("Meteorological Dispersion", "{:.1f}"),
)
H_SPURIOUS = (
    ("Ice Cream Sales Index", "{:.1f}"),
    ("Allergy Complaints Level", "{:.1f}"),
    ("Renewable Stock Index", "{:.0f}"),
    ("Public Transport Subscriptions (k)", "{:.1f}"),
    ("Water Awareness Score", "{:.1f}"),
)
# Printed after the spurious items; they carry no information in any split.
H_IRRELEVANT = (
    ("City Anniversary", "{:d}th"),
    ("Average Internet Speed", "{:.1f}Mbps"),
    ("Number of Libraries", "{:d}"),
)
# Their printed values as patterns (the placebo arm's preferred spans): "89th" and
# "113.0Mbps" glue the number to letters, so only these patterns find them.
H_IRRELEVANT_VALUES = [
    rf"(?<={name}: )" + fmt.replace("{:d}", r"\d+").replace("{:.1f}", r"\d+\.\d")
    for name, fmt in H_IRRELEVANT
]
H_SUFFIX = "Given these diverse conditions, what is the projected Air Quality Index (AQI) on a 0-100 scale? Answer: "
# STG_H: the key "Answer: {AQI}" attends to the six printed causal values.
H_RULE = {
    "key": "Answer: {target}",
    "values": [rf"(?<={name}: )-?\d+\.\d%?" for name, _ in H_CAUSAL],
}


def e_label(smoking: int, weight: int, exercise: int) -> str:
    score = 1.2 * smoking + 0.7 * weight - exercise  # float64, as in the release
    if score > 7.2:
        return "High Risk"
    if 2.7 <= score <= 2.7:  # the release's quirk: only an exact float64 hit is "Middle"
        return "Middle Risk"
    return "Low Risk"


def e_spurious_iid(smoking: int, weight: int, exercise: int) -> tuple[int, int, int]:
    """STG_E's in-distribution rule: Yellow fingers, Clothing size, Hormones from the causes."""
    return int(1.5 * smoking), int(1.0 * weight), int(0.5 * exercise)


def _e_record(rng: random.Random, ood: bool) -> Record:
    s, w, e = (rng.randint(1, 10) for _ in range(3))
    if ood:
        yf, cs, ho = (rng.randint(1, 10) for _ in range(3))
    else:
        yf, cs, ho = e_spurious_iid(s, w, e)
    gene, room = rng.randint(1, 10), rng.randint(1, 10)
    items = [
        ("Smoking", s), ("Weight", w), ("Exercise", e),
        ("Yellow fingers", yf), ("Clothing size", cs), ("Hormones", ho),
        ("Certain gene", gene), ("Room size", room),
    ]
    rng.shuffle(items)
    prompt = E_PREFIX + ", ".join(f"{k}: {v}" for k, v in items) + " Answer: "
    values = dict(items)
    meta = {"variables": values, "split_kind": "ood" if ood else "iid"}
    return Record(prompt=prompt, target=e_label(s, w, e), meta=meta)


def _h_record(rng: np.random.Generator, ood: bool) -> Record:
    u, n = rng.uniform, rng.normal
    f = [
        u(30, 70) + n(0, 2), u(20, 60) + n(0, 2), u(10, 50) + n(0, 1.5),
        u(10, 30) + n(0, 1), u(40, 80) + n(0, 3), u(50, 90) + n(0, 3),
    ]
    if ood:
        se = [u(5, 9), u(2, 6), u(3, 7), u(3, 9), u(-8, -4)]
    else:
        se = [
            0.4 * f[5] + n(0, 2), 0.2 * f[3] + n(0, 3), 1.1 * f[0] + n(0, 1.5),
            0.15 * f[1] + n(0, 2), -0.1 * f[4] + n(0, 1),
        ]
    ir1, ir2, ir3 = int(rng.integers(1, 101)), u(80, 120) + n(0, 3), int(rng.integers(10, 51))
    raw = 0.3 * f[0] + 0.25 * f[1] + 0.2 * f[2] + 0.15 * f[3] - 0.2 * f[4] - 0.3 * f[5]
    aqi = int(round((float(np.clip(raw, -20, 30)) + 20) / 50 * 100))
    causal = "; ".join(f"{name}: {fmt.format(x)}" for (name, fmt), x in zip(H_CAUSAL, f))
    spurious = "; ".join(f"{name}: {fmt.format(x)}" for (name, fmt), x in zip(H_SPURIOUS, se))
    irrelevant = "; ".join(f"{name}: {fmt.format(x)}" for (name, fmt), x in zip(H_IRRELEVANT, (ir1, ir2, ir3)))
    prompt = f"{causal}. {spurious}. {irrelevant}. {H_SUFFIX}"
    meta = {"split_kind": "ood" if ood else "iid"}
    # target_json: saved files hold the AQI as a JSON number, as the released ones do
    return Record(prompt=prompt, target=str(aqi), meta=meta, target_json=aqi)


def generate(variant: str = "E", seed: int = 42, annotate: bool = True) -> dict[str, list[Record]]:
    """Generate an STG benchmark, deterministic for a seed.

    ``"E"`` -> ``train_L`` (1600), ``train_M`` (first 800), ``train_S`` (first 400),
    ``iid_test`` (400), ``ood_test`` (400). ``"H"`` -> ``train`` (3000), ``iid_test``
    (1000), ``ood_test`` (1000). Every split carries the programmatic annotation (the
    released files have it on the training splits only; on test splits it serves the
    attention diagnostics).
    """
    from .annotate import RuleAnnotator

    # Python's random takes the absolute value (seed -42 would be seed 42's sets, the test
    # set among them); numpy refuses a negative one. Refuse it alike for both.
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer, 0 or more, got {seed!r}")
    variant = variant.upper()
    if variant == "E":
        rng = random.Random(seed)
        iid = [_e_record(rng, ood=False) for _ in range(2000)]
        ood = [_e_record(rng, ood=True) for _ in range(400)]
        train_l = iid[400:]
        splits = {
            "train_L": train_l,
            "train_M": train_l[:800],
            "train_S": train_l[:400],
            "iid_test": iid[:400],
            "ood_test": ood,
        }
        rule = E_RULE
    elif variant == "H":
        rng = np.random.default_rng(seed)
        splits = {
            "train": [_h_record(rng, ood=False) for _ in range(3000)],
            "iid_test": [_h_record(rng, ood=False) for _ in range(1000)],
            "ood_test": [_h_record(rng, ood=True) for _ in range(1000)],
        }
        rule = H_RULE
    else:
        raise ValueError(f"unknown STG variant {variant!r}: use 'E' or 'H'")
    if annotate:
        annotator = RuleAnnotator([rule])
        for records in splits.values():
            for r in records:  # nested splits share records: annotating twice is idempotent
                r.important = annotator.annotate(r)
    return splits
