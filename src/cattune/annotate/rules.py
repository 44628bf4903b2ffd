"""Programmatic annotation: "the KEY attends to the spans matching these regexes".

A rule is ``{"key": TEMPLATE, "values": [REGEX, ...]}``. ``TEMPLATE`` is formatted
with the record's ``target`` and ``prompt`` (``"{target}"`` makes the answer the key).
Each regex is searched in the prompt; every match becomes a value, in prompt order.
A file passed to ``cattune annotate --rule`` holds one rule object or a list of them
(JSON, or YAML when PyYAML is installed).
"""

from __future__ import annotations

import re
import string
from pathlib import Path

from ..files import load_config_file
from ..records import Annotation, Record


def _check_template(i: int, template: str) -> None:
    """Refuse a key template with fields other than ``{target}`` and ``{prompt}``: an
    unknown name, a stray brace, and also ``{target.x}``, ``{target[0]}``, ``{target!r}``
    or ``{target:>99999999}``, which fail or blow up on some record, not on the first."""
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        problem = str(e)
    else:
        bad = [(name, spec, conv) for name, spec, conv in fields if name not in ("target", "prompt") or spec or conv]
        if not bad:
            return
        name, spec, conv = bad[0]
        problem = "field {" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
    raise ValueError(f"rule {i}: bad key template {template!r} ({problem}); it may use {{target}} and {{prompt}} "
                     "as they are, literal braces are written {{ }}")


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
            _check_template(i, rule["key"])  # here, not on the first record
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
