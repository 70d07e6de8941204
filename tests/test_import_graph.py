"""The house's import rules, read from the source (every import statement, lazy ones inside functions included):
runtime/ imports no project package; tokenizer/ and generator/ never import each other; evaluation/ imports neither
stage; nothing but pipelines/ imports pipelines/ (pipelines/ sits on top and wires the stages together)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("runtime", "tokenizer", "generator", "evaluation", "pipelines")
ALLOWED = {  # package -> project packages it may import (besides itself)
    "runtime": set(),
    "tokenizer": {"runtime"},
    "generator": {"runtime"},
    "evaluation": {"runtime"},
    "pipelines": {"runtime", "tokenizer", "generator", "evaluation"},
}


def imports_of(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, top-level module) of every import in `path`; relative imports resolve to `package`."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.lineno, package if node.level else (node.module or "").split(".")[0]))
    return sorted(out)


def violations() -> list[str]:
    bad = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for line, mod in imports_of(path, pkg):
                if mod in PACKAGES and mod != pkg and mod not in ALLOWED[pkg]:
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {mod} ({pkg} may import: "
                               f"{', '.join(sorted(ALLOWED[pkg])) or 'no project package'})")
    return bad


def test_imports_flow_one_way():
    assert violations() == []


def test_the_checker_catches_a_violation(tmp_path):
    p = tmp_path / "x.py"
    p.write_text("import os\ndef f():\n    from pipelines import MGVQPipeline\nfrom .model import GPT\n")
    assert imports_of(p, "evaluation") == [(1, "os"), (3, "pipelines"), (4, "evaluation")]
