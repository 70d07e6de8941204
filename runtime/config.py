"""Config loading for every entry point: dataclass defaults <- YAML file <- `key=value` overrides (one parser, one
precedence rule). Dotted keys reach into dict fields (`loss.disc_start=100`, `model_overrides.vqgan.ch=16`).

    cfg = load_config(TrainConfig, "configs/generator/tiny.yaml", ["lr=2e-4", "model_overrides.dim=512"])

Values are YAML scalars (`[1,2]`, `null`, `true`), except that `1e-4`-style numbers (strings in YAML 1.1) become
floats; a float field given an int gets a float. Unknown keys fail with a did-you-mean hint. Renamed keys: a config
class may declare `RENAMED = {"old": "new"}` (and a `migrate(d)` classmethod for renames that are not one-to-one);
old names still work, with a deprecation message naming the new one.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import warnings
from typing import Any


def parse_value(text: str) -> Any:
    """A command-line value: YAML, with `1e-3` (a string in YAML 1.1) read as a float."""
    import yaml

    v = yaml.safe_load(text)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            pass
    return v


def parse_overrides(items: list[str] | None) -> list[tuple[str, Any]]:
    """['a=1', 'b.c=x'] -> [('a', 1), ('b.c', 'x')] (values through `parse_value`)."""
    out = []
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value (e.g. lr=2e-4 or loss.disc_start=100)")
        k, v = item.split("=", 1)
        out.append((k.strip(), parse_value(v)))
    return out


def set_dotted(d: dict, key: str, value: Any) -> None:
    """d['a']['b'] = value for key 'a.b' (creating nested dicts); dict values merge into dicts."""
    *parents, leaf = key.split(".")
    node = d
    for p in parents:
        if node.get(p) is None:
            node[p] = {}
        if not isinstance(node[p], dict):
            raise ValueError(f"override {key!r}: {p!r} is not a section (it holds {node[p]!r})")
        node = node[p]
    if isinstance(value, dict) and isinstance(node.get(leaf), dict):
        for k, v in value.items():
            set_dotted(node[leaf], k, v)
    else:
        node[leaf] = list(value) if isinstance(value, tuple) else value


def deprecated(old: str, new: str, what: str) -> None:
    msg = f"{what}: `{old}` is deprecated, use `{new}` (the old name is still accepted for now)"
    warnings.warn(msg, FutureWarning, stacklevel=3)
    print(f"warning: {msg}", file=sys.stderr)


def _coerce(name: str, annotation: str, value: Any) -> Any:
    if isinstance(value, str) and value.lower() in ("null", "none", "~") and "None" in annotation:
        return None
    if "float" in annotation and not isinstance(value, bool):
        if isinstance(value, int):
            return float(value)
        if isinstance(value, str) and "str" not in annotation:
            try:
                return float(value)
            except ValueError:
                raise ValueError(f"{name}={value!r}: expected a number") from None
    if annotation.startswith("int") and isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{name}={value!r}: expected an integer") from None
    return value


def read_yaml(path: str | os.PathLike | None) -> dict:
    import yaml

    if not path:
        return {}
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {os.fspath(path)!r} not found")
    with open(path) as f:
        d = yaml.safe_load(f) or {}
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a YAML mapping of config fields, got {type(d).__name__}")
    return d


def load_config(cls, path: str | os.PathLike | None = None, overrides: list[str] | dict | None = None,
                what: str | None = None):
    """`cls` (a dataclass) from its defaults <- YAML `path` <- `overrides` (list of key=value, or a dict).

    Renamed keys are mapped in each layer first, so the precedence rule holds whichever name a layer uses."""
    what = what or f"{cls.__module__}.{cls.__name__}"
    d = rename_keys(cls, read_yaml(path), what)
    layer: dict = {}
    for k, v in (list(overrides.items()) if isinstance(overrides, dict) else parse_overrides(overrides)):
        set_dotted(layer, k, v)
    for k, v in rename_keys(cls, layer, what).items():
        set_dotted(d, k, v)
    return build_config(cls, d, what)


def rename_keys(cls, d: dict, what: str) -> dict:
    """One layer's old names -> new names (`cls.migrate(d)`, then `cls.RENAMED`), with a deprecation message."""
    d = dict(d)
    migrate = getattr(cls, "migrate", None)
    if migrate is not None:
        d = migrate(d)
    for old, new in getattr(cls, "RENAMED", {}).items():
        if old in d:
            deprecated(old, new, what)
            if new in d:
                raise ValueError(f"{what}: both `{old}` (deprecated) and `{new}` given; keep `{new}`")
            d[new] = d.pop(old)
    return d


def build_config(cls, d: dict, what: str | None = None):
    """`cls(**d)` after unknown-key checks and type coercion (keys already renamed)."""
    what = what or f"{cls.__module__}.{cls.__name__}"
    types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(types))
    if unknown:
        hints = [f"{u} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(u, types, 1)) else u
                 for u in unknown]
        raise ValueError(f"{what}: unknown key(s): {', '.join(hints)}; valid keys: {sorted(types)}")
    return cls(**{k: _coerce(k, types[k], v) for k, v in d.items()})


def to_dict(cfg) -> dict:
    """A config dataclass as plain JSON/YAML-able data (tuples -> lists)."""
    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}
