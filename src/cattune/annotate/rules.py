"""Programmatic annotation: "the KEY attends to the spans matching these regexes".

A rule is ``{"key": TEMPLATE, "values": [REGEX, ...]}``. ``TEMPLATE`` is formatted
with the record's ``target`` and ``prompt`` (``"{target}"`` makes the answer the key).
Each regex is searched in the prompt; every match becomes a value, in prompt order.
A file passed to ``cattune annotate --rule`` holds one rule object or a list of them
(JSON, or YAML when PyYAML is installed).
"""

from __future__ import annotations

import re
from pathlib import Path

from ..records import Annotation, Record, load_config_file


class RuleAnnotator:
    def __init__(self, rules: list[dict]):
        if not rules:
            raise ValueError("a rule annotator needs at least one rule")
        self.rules = []
        for i, rule in enumerate(rules):
            if not isinstance(rule, dict) or "key" not in rule or "values" not in rule:
                raise ValueError(f"rule {i}: needs 'key' (a template) and 'values' (a list of regexes)")
            if unknown := sorted(set(rule) - {"key", "values"}):
                raise ValueError(f"rule {i}: unknown field(s) {', '.join(map(repr, unknown))}; a rule has 'key' "
                                 "and 'values'")
            values = rule["values"]
            if isinstance(values, str):
                values = [values]
            if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
                raise ValueError(f"rule {i}: 'values' must be a regex or a non-empty list of regexes (strings), "
                                 f"got {values!r}")
            if not isinstance(rule["key"], str):
                raise ValueError(f"rule {i}: 'key' must be a template string such as '{{target}}', got {rule['key']!r}")
            try:
                patterns = [re.compile(v) for v in values]
            except re.error as e:
                raise ValueError(f"rule {i}: bad regex: {e}") from None
            try:  # fail here, not on the first record, for "{answer}" or a stray "{"
                str(rule["key"]).format(target="", prompt="")
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(
                    f"rule {i}: bad key template {rule['key']!r} ({type(e).__name__}: {e}); "
                    "it may use {target} and {prompt}, literal braces are written {{ }}"
                ) from None
            self.rules.append((str(rule["key"]), patterns))

    def annotate(self, record: Record) -> Annotation:
        out: Annotation = []
        for key_template, patterns in self.rules:
            key = key_template.format(target=record.target, prompt=record.prompt)
            hits = sorted(
                {(m.start(), m.group(0)) for p in patterns for m in p.finditer(record.prompt) if m.group(0)}
            )
            # One value per matched span: two patterns hitting the same span give it once,
            # but two items that print the same number stay two values (STG_H's release
            # lists all six causal values even when two coincide).
            values = [text for _, text in hits]
            if key and values:
                out.append((key, values))
        return out


def load_rules(path: str | Path) -> RuleAnnotator:
    data = load_config_file(path)
    if isinstance(data, dict):
        data = [data]
    try:
        return RuleAnnotator(data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
