"""The Spurious Token Game generator against the files released with the paper.

STG_E (Python's `random`, seed 42) reproduces the released files exactly. STG_H used a
NumPy stream we cannot replay, so it is compared by statistics: every tolerance below is
four standard errors of the difference between two independent samples of that size, so
a correct generator fails with probability well under 1e-3 per check, while a wrong
coefficient, range or link moves the statistic by many standard errors.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter

import numpy as np
import pytest

from cattune import stg
from cattune.annotate import RuleAnnotator
from cattune.records import Record, load_records, save_records

from conftest import STG_E_FILES, STG_H_FILES


# These tests compare with every record of the released files: without them they are
# skipped (conftest.release_dir), rather than run on the few records in tests/data.
@pytest.fixture(scope="module")
def stg_e_released(release_dir):
    return {split: load_records(release_dir / "stg_paper" / name) for split, name in STG_E_FILES.items()}


@pytest.fixture(scope="module")
def stg_h_released(release_dir):
    return {split: load_records(release_dir / "stg_paper" / name) for split, name in STG_H_FILES.items()}


@pytest.fixture(scope="module")
def ours_e():
    return stg.generate("E", seed=42)


@pytest.fixture(scope="module")
def ours_h():
    return stg.generate("H", seed=42)


# --- STG_E ------------------------------------------------------------------------------

E_ITEM = re.compile(r"(Smoking|Weight|Exercise|Yellow fingers|Clothing size|Hormones|Certain gene|Room size): (\d+)")


def e_values(record) -> dict[str, int]:
    items = dict((name, int(v)) for name, v in E_ITEM.findall(record.prompt))
    assert len(items) == 8, record.prompt
    return items


def test_stg_e_reproduces_the_released_files(ours_e, stg_e_released):
    assert set(ours_e) == set(stg_e_released)
    for split, released in stg_e_released.items():
        ours = ours_e[split]
        assert len(ours) == len(released), split
        assert [r.prompt for r in ours] == [r.prompt for r in released], split
        assert [r.target for r in ours] == [r.target for r in released], split
        if split.startswith("train"):
            assert [r.important for r in ours] == [r.important for r in released], split
        else:
            assert all(not r.important for r in released)  # released test files carry none


def test_stg_e_sizes_and_nesting(ours_e):
    assert {k: len(v) for k, v in ours_e.items()} == {
        "train_L": 1600, "train_M": 800, "train_S": 400, "iid_test": 400, "ood_test": 400,
    }
    assert ours_e["train_M"] == ours_e["train_L"][:800]
    assert ours_e["train_S"] == ours_e["train_L"][:400]
    # The test set is drawn from the same stream, not a copy of training records.
    assert not {r.prompt for r in ours_e["iid_test"]} & {r.prompt for r in ours_e["train_L"]}


def test_stg_e_annotation_is_the_three_causes_in_prompt_order(ours_e):
    for split, records in ours_e.items():
        for r in records:
            names = [name for name, _ in E_ITEM.findall(r.prompt) if name in stg.E_CAUSAL]
            values = e_values(r)
            assert r.important == [(r.target, [f"{n}: {values[n]}" for n in names])]


def test_stg_e_labels_follow_the_score_and_the_spurious_links_break_out_of_distribution(ours_e, stg_e_released):
    for records in (*ours_e.values(), *stg_e_released.values()):
        for r in records:
            v = e_values(r)
            assert r.target == stg.e_label(v["Smoking"], v["Weight"], v["Exercise"])

    def linked(r):
        v = e_values(r)
        return (v["Yellow fingers"], v["Clothing size"], v["Hormones"]) == (
            int(1.5 * v["Smoking"]), v["Weight"], int(0.5 * v["Exercise"]))

    for source in (ours_e, stg_e_released):
        assert all(linked(r) for split in ("train_L", "iid_test") for r in source[split])
        # Independent draws hit all three links with probability about 1/1000.
        assert sum(linked(r) for r in source["ood_test"]) <= 2


def test_stg_e_middle_risk_is_only_an_exact_float_hit():
    # 1.2*s + 0.7*w - e == 2.7 exactly in float64 for a handful of triples only.
    middle = [(s, w, e) for s in range(1, 11) for w in range(1, 11) for e in range(1, 11)
              if stg.e_label(s, w, e) == "Middle Risk"]
    assert middle and all(1.2 * s + 0.7 * w - e == 2.7 for s, w, e in middle)
    assert len(middle) < 10
    assert stg.e_label(10, 1, 1) == "High Risk" and stg.e_label(1, 1, 10) == "Low Risk"


def test_stg_e_is_deterministic_per_seed(ours_e):
    again = stg.generate("E", seed=42)
    assert [r.prompt for r in again["train_L"]] == [r.prompt for r in ours_e["train_L"]]
    other = stg.generate("E", seed=7)
    same = sum(a.prompt == b.prompt for a, b in zip(other["train_L"], ours_e["train_L"]))
    assert same <= 5  # two 8-item shuffles of 10^8 value combinations almost never agree


def test_stg_e_label_shares_of_another_seed_match_the_release(stg_e_released):
    # Seed 42 matches exactly (above); another seed must give the same label distribution.
    other = stg.generate("E", seed=7, annotate=False)
    for split in ("train_L", "ood_test"):
        n = len(other[split])
        ours = Counter(r.target for r in other[split])
        released = Counter(r.target for r in stg_e_released[split])
        for label in ("High Risk", "Low Risk"):
            p = released[label] / n
            tol = 4 * math.sqrt(2 * p * (1 - p) / n)
            assert abs(ours[label] / n - p) <= tol, (split, label)
    released_shares = Counter(r.target for r in stg_e_released["train_L"])
    assert released_shares == {"Low Risk": 1049, "High Risk": 545, "Middle Risk": 6}


def test_unknown_variant_is_rejected():
    with pytest.raises(ValueError, match="unknown STG variant"):
        stg.generate("X")


# --- STG_H ------------------------------------------------------------------------------

NUM = r"(-?\d+(?:\.\d+)?)"
H_NAMES = [name for name, _ in stg.H_CAUSAL] + [name for name, _ in stg.H_SPURIOUS]
# The template of docs/method.md section 5, written out independently of stg.py.
H_TEMPLATE = re.compile(
    r"Industrial Emissions: -?\d+\.\d; Vehicle Emissions: -?\d+\.\d; Coal Dependency: -?\d+\.\d%; "
    r"Agricultural Burning: -?\d+\.\d; Urban Green Coverage: -?\d+\.\d%; Meteorological Dispersion: -?\d+\.\d\. "
    r"Ice Cream Sales Index: -?\d+\.\d; Allergy Complaints Level: -?\d+\.\d; Renewable Stock Index: -?\d+; "
    r"Public Transport Subscriptions \(k\): -?\d+\.\d; Water Awareness Score: -?\d+\.\d\. "
    r"City Anniversary: \d+th; Average Internet Speed: -?\d+\.\dMbps; Number of Libraries: \d+\. "
    r"Given these diverse conditions, what is the projected Air Quality Index \(AQI\) on a 0-100 scale\? Answer: "
)
# (spurious item, its cause, coefficient, noise sd) of the IID links
H_LINKS = [
    ("Ice Cream Sales Index", "Meteorological Dispersion", 0.4, 2.0),
    ("Allergy Complaints Level", "Agricultural Burning", 0.2, 3.0),
    ("Renewable Stock Index", "Industrial Emissions", 1.1, 1.5),
    ("Public Transport Subscriptions (k)", "Vehicle Emissions", 0.15, 2.0),
    ("Water Awareness Score", "Urban Green Coverage", -0.1, 1.0),
]


def h_table(records) -> dict[str, np.ndarray]:
    rows = []
    for r in records:
        rows.append([float(re.search(re.escape(n) + ": " + NUM, r.prompt).group(1)) for n in H_NAMES])
    table = dict(zip(H_NAMES, np.array(rows).T))
    table["AQI"] = np.array([int(r.target) for r in records], dtype=float)
    return table


def test_stg_h_sizes_and_template(ours_h, stg_h_released):
    assert {k: len(v) for k, v in ours_h.items()} == {"train": 3000, "iid_test": 1000, "ood_test": 1000}
    for source in (ours_h, stg_h_released):
        for records in source.values():
            assert all(H_TEMPLATE.fullmatch(r.prompt) for r in records)
            assert all(re.fullmatch(r"\d+", r.target) and 0 <= int(r.target) <= 100 for r in records)


def test_stg_h_irrelevant_value_patterns_find_one_value_each(ours_h, stg_h_released):
    # The placebo arm prefers these spans; each must find the whole printed value.
    expected = [r"\d+th", r"\d+\.\dMbps", r"\d+"]
    for source in (ours_h, stg_h_released):
        for r in source["ood_test"][:200]:
            for pattern, whole in zip(stg.H_IRRELEVANT_VALUES, expected):
                (m,) = re.finditer(pattern, r.prompt)
                assert re.fullmatch(whole, m.group()) and r.prompt[m.end()] in ";.", (pattern, r.prompt)


def test_stg_h_aqi_is_the_formula_of_the_printed_causes(ours_h):
    # Printed values are rounded to 0.1, so the recomputed AQI can be off by one.
    for records in ours_h.values():
        t = h_table(records)
        f = [t[name] for name, _ in stg.H_CAUSAL]
        raw = 0.3 * f[0] + 0.25 * f[1] + 0.2 * f[2] + 0.15 * f[3] - 0.2 * f[4] - 0.3 * f[5]
        aqi = np.round((np.clip(raw, -20, 30) + 20) / 50 * 100)
        assert np.abs(aqi - t["AQI"]).max() <= 1
        assert np.mean(aqi == t["AQI"]) > 0.9


def test_stg_h_label_distribution_matches_the_release(ours_h, stg_h_released):
    for split in ("train", "iid_test", "ood_test"):
        a, b = h_table(ours_h[split])["AQI"], h_table(stg_h_released[split])["AQI"]
        n = len(b)
        sd = b.std()
        assert 12 < sd < 15  # the released spread, about 13.3
        assert abs(a.mean() - b.mean()) <= 4 * sd * math.sqrt(2 / n), split
        assert abs(a.std() - b.std()) <= 4 * sd / math.sqrt(n), split  # SE of an sd: sd/sqrt(2n), twice
        # Two-sample Kolmogorov-Smirnov: critical value 1.95*sqrt(2/n) at p = 0.001.
        grid = np.arange(0, 101)
        ks = np.abs(np.searchsorted(np.sort(a), grid, "right") - np.searchsorted(np.sort(b), grid, "right")).max() / n
        assert ks <= 1.95 * math.sqrt(2 / n), split


def test_stg_h_spurious_links_hold_iid_and_break_ood(ours_h, stg_h_released):
    for source in ("ours", "released"):
        data = ours_h if source == "ours" else stg_h_released
        for split in ("train", "iid_test", "ood_test"):
            t = h_table(data[split])
            for se, cause, coef, sd in H_LINKS:
                r = np.corrcoef(t[cause], t[se])[0, 1]
                residual = np.abs(t[se] - coef * t[cause]) / sd
                if split == "ood_test":
                    # Independent draws: correlation within 4 standard errors of 0.
                    assert abs(r) < 4 / math.sqrt(len(residual)), (source, se)
                else:
                    # Every record keeps the link: residuals are the N(0, sd) noise (plus
                    # print rounding), never more than 6 sd in 5000 draws.
                    assert residual.max() < 6, (source, split, se)
                    if se in ("Ice Cream Sales Index", "Renewable Stock Index"):
                        assert (r > 0.9) if coef > 0 else (r < -0.9), (source, split, se)
            if split == "ood_test":
                # The two strong links are far outside their noise for every OOD record.
                for se, cause, coef, sd in H_LINKS[0], H_LINKS[2]:
                    assert (np.abs(t[se] - coef * t[cause]) / sd).min() > 3, (source, se)


def test_stg_h_link_strengths_match_the_release(ours_h, stg_h_released):
    for split in ("train", "iid_test"):
        ours, released = h_table(ours_h[split]), h_table(stg_h_released[split])
        n = len(released["AQI"])
        for se, cause, _, _ in H_LINKS:
            r_ours = np.corrcoef(ours[cause], ours[se])[0, 1]
            r_rel = np.corrcoef(released[cause], released[se])[0, 1]
            assert abs(r_ours - r_rel) <= 4 * math.sqrt(2) * (1 - r_rel**2) / math.sqrt(n), (split, se)


def causal_values_as_printed(prompt: str) -> list[str]:
    return [re.search(re.escape(name) + r": (-?\d+\.\d%?)", prompt).group(1) for name, _ in stg.H_CAUSAL]


def test_stg_h_annotation_is_the_answer_attending_to_the_six_printed_causes(ours_h, stg_h_released):
    # The same derivation reproduces the release's annotations (so it is the right one),
    # including records where two causes print the same number (the list keeps both).
    for r in stg_h_released["train"]:
        assert r.important == [(f"Answer: {r.target}", causal_values_as_printed(r.prompt))]
    repeated = 0
    for records in ours_h.values():
        for r in records:
            values = causal_values_as_printed(r.prompt)
            assert r.important == [(f"Answer: {r.target}", values)]
            repeated += len(set(values)) < 6
    assert repeated > 0  # the duplicate case is exercised, as in the release (21 of 3000)


def test_stg_h_targets_are_saved_as_numbers_like_the_release(ours_h, tmp_path):
    path = tmp_path / "h.jsonl"
    save_records(path, ours_h["train"][:3])
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [type(o["target"]) for o in lines] == [int, int, int]
    assert [str(o["target"]) for o in lines] == [r.target for r in ours_h["train"][:3]]
    assert lines[0]["important"] == [{f"Answer: {lines[0]['target']}": causal_values_as_printed(lines[0]["input"])}]
    assert [r.target for r in load_records(path)] == [r.target for r in ours_h["train"][:3]]


def test_stg_h_is_deterministic_per_seed(ours_h):
    assert [r.prompt for r in stg.generate("H", seed=42, annotate=False)["ood_test"]] == [
        r.prompt for r in ours_h["ood_test"]
    ]
    other = stg.generate("H", seed=1, annotate=False)["ood_test"]
    assert not {r.prompt for r in other} & {r.prompt for r in ours_h["ood_test"]}


# --- the programmatic annotator behind both ------------------------------------------------


def test_rule_annotator_values_are_matched_spans_in_prompt_order():
    annotator = RuleAnnotator([{"key": "Answer: {target}", "values": [r"(?<=a: )\d+", r"(?<=b: )\d+", r"\d+(?=;)"]}])
    record = Record(prompt="b: 7; a: 7; c: 9 Answer: ", target="12")
    # "7" twice (two items print the same number) stays twice; the span "7;" that both
    # the b-pattern and the third pattern match is given once.
    assert annotator.annotate(record) == [("Answer: 12", ["7", "7"])]
    assert RuleAnnotator([{"key": "{target}", "values": "zzz"}]).annotate(record) == []


@pytest.mark.parametrize(
    "rule, reason",
    [
        ({"key": "{target}", "values": ["("]}, "bad regex"),
        ({"key": "{answer}", "values": ["x"]}, "bad key template"),
        ({"key": "{", "values": ["x"]}, "bad key template"),
        ({"values": ["x"]}, "needs 'key'"),
        ({"key": "{target}", "values": [5]}, "'values' must be"),
        ({"key": "{target}", "values": None}, "'values' must be"),
        ({"key": "{target}", "values": {"a": "b"}}, "'values' must be"),
        ({"key": "{target}", "values": []}, "'values' must be"),
        ({"key": "{target}", "values": ["x"], "vals": ["y"]}, "unknown field.*'vals'"),
        ({"key": 3, "values": ["x"]}, "'key' must be a template"),
    ],
)
def test_rule_annotator_rejects_bad_rules_up_front(rule, reason):
    with pytest.raises(ValueError, match=reason):
        RuleAnnotator([rule])
