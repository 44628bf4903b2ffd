"""Values from a YAML file checked against a dataclass's field types, before any work.

``HfArgumentParser.parse_dict`` and argparse defaults hand such values to the dataclass
unchecked (a "1e-3" string, which YAML does not read as a number, would reach the
optimizer), so every name and value is checked here: YAML strings such as "1e-3" or
"false" become the number or boolean the field takes, anything else is refused with
the field's name. Used by experiment configs and ``cattune train --config``.
"""

from __future__ import annotations

import difflib
import enum
import math
import types as pytypes
import typing
from typing import Any


def typed_fields(values: dict, types: dict[str, Any], where: str, error: type[Exception] = ValueError,
                 what: str = "field", reserved: dict[str, str] | None = None) -> dict:
    """``values`` converted to the ``types`` of their names; ``error`` naming ``where`` and
    the field for an unknown name, a ``reserved`` one (name -> why) or a wrong value."""
    out = {}
    for k, v in values.items():
        if not isinstance(k, str) or k not in types:
            # "cat_aplha" -> cat_alpha; "catalpha" -> cat_alpha (difflib alone ranks that one low)
            close = ([n for n in types if n.replace("_", "") == str(k).replace("_", "")]
                     or difflib.get_close_matches(str(k), list(types), n=1, cutoff=0.8))
            raise error(f"{where}: {k!r} is not a {what}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        if reserved and k in reserved:
            raise error(f"{where}: {k!r} {reserved[k]}")
        try:
            out[k] = _typed(v, types[k])
        except (TypeError, ValueError):
            raise error(f"{where}: {k} must be {_type_name(types[k])}, got {v!r}") from None
    return out


_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def _typed(value: Any, tp: Any) -> Any:
    """``value`` as a field of type ``tp`` takes it; TypeError/ValueError when it cannot.
    Ints stay ints in float fields (the settings hash of finished runs depends on them)."""
    origin, members = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, pytypes.UnionType):
        exact = [m for m in members if _matches(value, m)]
        if exact:
            return _typed(value, exact[0])
        for m in members:  # a string spelling a number or a boolean
            try:
                return _typed(value, m)
            except (TypeError, ValueError):
                continue
        raise TypeError(value)
    if tp is type(None):
        if value is None:
            return None
        raise TypeError(value)
    if origin is typing.Literal:
        if value in members:
            return value
        raise ValueError(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise TypeError(value)
    if tp in (int, float):
        if isinstance(value, bool):
            raise TypeError(value)
        if isinstance(value, str):
            return tp(value.strip())
        if tp is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int) or (tp is float and isinstance(value, float)):
            return value
        raise TypeError(value)
    if tp is str or (isinstance(tp, type) and issubclass(tp, enum.Enum)):
        if isinstance(value, str):
            return value
        raise TypeError(value)
    if origin is list or tp is list:
        if not isinstance(value, list):
            if not members or isinstance(value, (dict, tuple, set)):
                raise TypeError(value)
            return [_typed(value, members[0])]  # `cat_layers: -1`, as on the command line
        return [_typed(v, members[0]) for v in value] if members else value
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise TypeError(value)
        return value
    return value  # a library type (e.g. ParallelismConfig): TrainingArguments checks it


def _matches(value: Any, tp: Any) -> bool:
    base = typing.get_origin(tp) or tp
    if tp is type(None):
        return value is None
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(base, type) and isinstance(value, base) and not (base is not bool and isinstance(value, bool))


def _type_name(tp: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    members = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, pytypes.UnionType) else (tp,)
    return " or ".join(names.get(m, getattr(m, "__name__", str(m))) for m in members)


def check_number(name: str, value: Any, low: float, high: float | None = None, *, integer: bool = False,
                 above: bool = False, unit: str = "", shown: str | None = None) -> Any:
    """``value`` if it is a finite number (an int with ``integer``) from ``low`` (excluded
    with ``above``) to ``high``; else ``ValueError``: "NAME must be ..., got VALUE" (or ``shown``)."""
    kind = "an integer" if integer else "a number"
    ok = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
    ok = ok and (integer or math.isfinite(value)) and (value > low if above else value >= low)
    ok = ok and (high is None or value <= high)
    if not ok:
        if above and low == 0:
            what = f"{'a positive integer' if integer else 'a positive number'}{unit}"
            what += f" up to {high:g}" if high is not None else ""
        elif high is None:
            what = f"{kind}{unit} >= {low:g}"
        else:
            what = f"{kind}{unit} from {low:g} to {high:g}"
        raise ValueError(f"{name + ' ' if name else ''}must be {what}, got {shown or repr(value)}")
    return value
