"""The table of `mgvq compare` (the command is pipelines/compare.py: it evaluates several pipelines with the same
sampler settings, seeds, labels, reference and evaluator; this module only lays out their metrics side by side)."""
from __future__ import annotations


COLUMNS = ("fid", "sfid", "inception_score", "precision", "recall", "images_per_s", "num_images")
# scored by a classifier of the generator's classes (`--feature-net DIR`): FD in its feature space, accuracy
CLASSIFIER_COLUMNS = ("fd", "accuracy", "classifier_score", "precision", "recall", "images_per_s", "num_images")


def columns_for(metrics: dict) -> tuple[str, ...]:
    """The table's columns for one evaluation's metrics.json: Inception's, or a classifier feature net's."""
    return CLASSIFIER_COLUMNS if metrics.get("feature_net", "inception-v3-compat") != "inception-v3-compat" \
        else COLUMNS


def format_compare(rows: dict[str, dict], columns: tuple[str, ...] | None = None) -> str:
    """rows {name: {column: value}} -> a text table; `columns` default: Inception's (COLUMNS)."""
    cols = columns or COLUMNS
    w = max(8, *(len(n) for n in rows))
    head = f"{'pipeline':<{w}}  " + "  ".join(f"{c:>15}" for c in cols)
    lines = [head, "-" * len(head)]
    for n, r in rows.items():
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(f"{'-' if v is None else (f'{v:.4f}' if isinstance(v, float) else v):>15}")
        lines.append(f"{n:<{w}}  " + "  ".join(cells))
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    sys.exit("the compare command moved to the pipelines (evaluation/ is a library): run `mgvq compare ...` or "
             "`python -m pipelines.compare ...` (same flags)")
