"""Command-line values shared by the sampling verbs (`mgvq sample`, `mgvq evaluate-generation`, `mgvq compare`).

`--top-k`, `--top-p` and `--temperature` take one value for every sub-codebook or one per sub-codebook,
comma-separated: `--top-k 4096` or `--top-k 4096,2048,1024,512` (G=4). Each value is checked when the command
line is parsed (type, sign, finiteness, range); the count is checked against the pipeline's G (and top-k against
its K) by `check_sampling_args` before any model is loaded.

top-k is a COUNT of codes kept per sub-codebook here (0 = off, 1 = greedy). MGVQ's released `sample_c2i.py`
takes log2 of it instead: its `--top-k 12` keeps 2**12 = 4096 codes, i.e. `--top-k 4096` here.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from typing import Callable

Number = int | float
PerGroup = Number | list[Number]

_HELP = {
    "top_k": "codes kept per sub-codebook: one count for all groups or one per group, e.g. 4096 or 4096,2048,1024,512 "
             "(0 = off, 1 = greedy). MGVQ's sample_c2i.py takes log2: its --top-k 12 is --top-k 4096 here",
    "top_p": "nucleus top-p in (0, 1]: one value or one per group, e.g. 0.95 or 1,0.95,0.9,0.9 (1 = off)",
    "temperature": "sampling temperature >= 0: one value or one per group, e.g. 1.0 or 1.0,1.0,0.9,0.8 (0 = greedy)",
}
# name -> (integer?, valid-range text, predicate)
_RULES: dict[str, tuple[bool, str, Callable[[float], bool]]] = {
    "top_k": (True, "an integer >= 0 (0 = off, 1 = greedy)", lambda v: v >= 0),
    "top_p": (False, "a number in (0, 1] (1 = off)", lambda v: 0.0 < v <= 1.0),
    "temperature": (False, "a finite number >= 0 (0 = greedy)", lambda v: v >= 0.0),
}


def parse_per_group(name: str, text: str) -> PerGroup:
    """Parse `text` ("4096" or "4096,2048,...") for sampling setting `name` (top_k | top_p | temperature).

    Returns a scalar for one value, a list for several. Raises ValueError naming the value and what is valid."""
    if name not in _RULES:
        raise ValueError(f"unknown sampling setting {name!r}; valid: {', '.join(_RULES)}")
    integer, valid, ok = _RULES[name]
    flag = "--" + name.replace("_", "-")
    parts = [p.strip() for p in str(text).split(",")]
    if not parts or any(p == "" for p in parts):
        raise ValueError(f"{flag} {text!r}: empty value; give one value or one per sub-codebook, comma-separated")
    vals: list[Number] = []
    for p in parts:
        try:
            v = float(p)
        except ValueError:
            raise ValueError(f"{flag} {text!r}: {p!r} is not a number; each value must be {valid}") from None
        if not math.isfinite(v):
            raise ValueError(f"{flag} {text!r}: {p!r} is not finite; each value must be {valid}")
        if integer:
            if v != int(v):
                raise ValueError(f"{flag} {text!r}: {p!r} is not an integer; each value must be {valid}")
            v = int(v)
        if not ok(v):
            raise ValueError(f"{flag} {text!r}: {p!r} is out of range; each value must be {valid}")
        vals.append(v)
    return vals[0] if len(vals) == 1 else vals


def _argparse_type(name: str) -> Callable[[str], PerGroup]:
    def convert(text: str) -> PerGroup:
        try:
            return parse_per_group(name, text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = name  # argparse names the type in its messages
    return convert


def add_sampling_args(parser: argparse.ArgumentParser, default_note: str = "") -> None:
    """Add --temperature / --top-k / --top-p (scalar or per sub-codebook, validated at parse time) to `parser`."""
    for name in ("temperature", "top_k", "top_p"):
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=_argparse_type(name), default=None,
                            metavar="V[,V...]", help=_HELP[name] + default_note)


def check_sampling_args(values: dict[str, PerGroup | None], groups: int, codebook_size: int | None = None,
                        prog: str = "mgvq") -> None:
    """Raise SystemExit when a per-group list does not have one value per sub-codebook (G=`groups`) or a top-k
    exceeds the codebook size K. `values`: {"top_k": ..., "top_p": ..., "temperature": ...} (None = not given)."""
    for name, v in values.items():
        if v is None:
            continue
        flag = "--" + name.replace("_", "-")
        vals = v if isinstance(v, (list, tuple)) else [v]
        if len(vals) not in (1, groups):
            raise SystemExit(f"{prog}: {flag} {','.join(map(str, vals))} has {len(vals)} values; the pipeline has "
                             f"G={groups} sub-codebooks: give one value for all or exactly {groups}, comma-separated")
        if name == "top_k" and codebook_size is not None and max(vals) > codebook_size:
            raise SystemExit(f"{prog}: {flag} {','.join(map(str, vals))}: a top-k above the codebook size "
                             f"K={codebook_size} is invalid; valid: 0..{codebook_size} codes per sub-codebook "
                             f"(MGVQ's log2 convention: --top-k 12 there is --top-k 4096 here)")


def pipeline_layout(pipeline_dir: str) -> tuple[int, int] | None:
    """(G, K) from a pipeline folder's generator/config.json without loading weights; None if it cannot be read
    (a hub id, or a folder another check will report)."""
    path = os.path.join(pipeline_dir, "generator", "config.json")
    try:
        with open(path) as f:
            cfg = json.load(f)
        return int(cfg["groups"]), int(cfg["codebook_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
