"""FIELD=VALUE changes to a config dataclass, for the bench scripts' --set options
(bench/reranker.py, bench/tune_small.py, bench/zero_shot_curve.py).

Each value is typed like the field's current value: a bool from "1"/"true"/"yes", a
tuple from a comma list of its elements' type ("image_widths=32,64,64,128",
"betas=0.9,0.98"), a field that is None by default from JSON
('attention_kinds=["row","column","row","conv"]', else the plain string), anything
else by its type's constructor ("lr=3e-3", "n_head=8").
"""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Any


def parse_overrides(pairs: list[str], config, option: str = "--set") -> dict[str, Any]:
    """["lr=3e-3", ...] -> {"lr": 0.003}; an unknown field or a pair without "=" stops
    the script, naming `option` and the config's fields."""
    current = {f.name: getattr(config, f.name) for f in fields(config)}
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in current:
            raise SystemExit(f"{option} {pair!r}: expected FIELD=VALUE with a {type(config).__name__} field "
                             f"({', '.join(sorted(current))})")
        out[key] = _typed(value, current[key])
    return out


def _typed(value: str, like: Any) -> Any:
    if isinstance(like, bool):
        return value.lower() in ("1", "true", "yes")
    if isinstance(like, tuple):
        element = type(like[0]) if like else str
        return tuple(element(v) for v in value.split(","))
    if like is None:
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return type(like)(value)
