"""The table of `mgvq compare` (the command is pipelines/compare.py: it evaluates several pipelines with the same
sampler settings, seeds, labels, reference and evaluator; this module only lays out their metrics side by side)."""
from __future__ import annotations


COLUMNS = ("fid", "sfid", "inception_score", "precision", "recall", "num_images")


def format_compare(rows: dict[str, dict]) -> str:
    w = max(8, *(len(n) for n in rows))
    head = f"{'pipeline':<{w}}  " + "  ".join(f"{c:>15}" for c in COLUMNS)
    lines = [head, "-" * len(head)]
    for n, r in rows.items():
        cells = []
        for c in COLUMNS:
            v = r.get(c)
            cells.append(f"{'-' if v is None else (f'{v:.4f}' if isinstance(v, float) else v):>15}")
        lines.append(f"{n:<{w}}  " + "  ".join(cells))
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    sys.exit("the compare command moved to the pipelines (evaluation/ is a library): run `mgvq compare ...` or "
             "`python -m pipelines.compare ...` (same flags)")
