"""The committed reference fixtures (tests/fixtures/reference/): exactly the files their README lists, with those
sha256; made by tests/fixtures/make_reference.py from the pinned LlamaGen / MGVQ commits, which the script's --help,
the README and every fixture's JSON name. Nothing here needs the original code."""
import ast
import hashlib
import importlib.util
import json
import re
import subprocess
import sys

import pytest
from safetensors import safe_open

from _paths import IN_REPO

SCRIPT = IN_REPO.parent / "make_reference.py"
NAMES = ["llamagen_vq", "llamagen_gpt", "llamagen_gpt_t2i", "mgvq_tokenizer", "mgvq_gpt"]
ROW = re.compile(r"^\| `([^`]+)` \| `([0-9a-f]{64})` \|$", re.M)


def pins() -> dict:
    """The script's module-level string constants (read from its source, not imported)."""
    out = {}
    for node in ast.parse(SCRIPT.read_text()).body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            out.update({t.id: node.value.value for t in node.targets if isinstance(t, ast.Name)})
    return out


def test_fixture_files_match_the_sha256_the_readme_lists():
    listed = dict(ROW.findall((IN_REPO / "README.md").read_text()))
    on_disk = sorted(p.name for p in IN_REPO.iterdir() if p.name != "README.md")
    assert on_disk == sorted(f"{n}.{ext}" for n in NAMES for ext in ("json", "safetensors"))
    assert sorted(listed) == on_disk  # every file listed once, nothing listed that is not there
    for name, digest in listed.items():
        assert hashlib.sha256((IN_REPO / name).read_bytes()).hexdigest() == digest, f"{name} differs from the README"
    size = sum((IN_REPO / n).stat().st_size for n in on_disk)
    assert size < 16e6, size  # tiny models: a few MB


def test_readme_and_fixtures_name_the_pinned_commits():
    c = pins()
    readme = (IN_REPO / "README.md").read_text()
    for repo, commit in [(c["LLAMAGEN_REPO"], c["LLAMAGEN_COMMIT"]), (c["MGVQ_REPO"], c["MGVQ_COMMIT"])]:
        assert re.fullmatch(r"[0-9a-f]{40}", commit)
        assert f"`{repo}` at commit `{commit}`" in readme
        assert f"checkout {commit}" in readme  # the regeneration steps
    assert "python tests/fixtures/make_reference.py --llamagen" in readme
    for name in NAMES:
        ref = json.loads((IN_REPO / f"{name}.json").read_text())["reference"]
        want = (c["LLAMAGEN_REPO"], c["LLAMAGEN_COMMIT"]) if name.startswith("llamagen") else \
            (c["MGVQ_REPO"], c["MGVQ_COMMIT"])
        assert (ref["repo"], ref["commit"]) == want, name


@pytest.mark.parametrize("name", NAMES)
def test_json_describes_every_tensor_and_the_reference_reproduced_itself(name):
    meta = json.loads((IN_REPO / f"{name}.json").read_text())
    for section in ("constructor", "seed", "re_randomized", "monkeypatches", "calls", "quirks", "numerics",
                    "validation"):
        assert section in meta, section
    described = {"state_dict." + k: v for k, v in meta["state_dict"]["keys"].items()} | meta["tensors"]
    with safe_open(str(IN_REPO / f"{name}.safetensors"), "pt") as f:
        assert set(f.keys()) == set(described)
        for k in f.keys():
            t = f.get_slice(k)
            assert list(t.get_shape()) == described[k]["shape"], k
            assert {"F32": "float32", "I64": "int64", "BOOL": "bool"}[t.get_dtype()] == described[k]["dtype"], k
    one = meta["validation"]["threads_1"]
    assert one["state_dict_roundtrip_equal"] and one["max_abs_diff_worst"] == 0.0  # bit for bit with 1 thread
    assert meta["validation"]["threads_2"]["max_abs_diff_worst"] < 1e-4
    assert meta["environment"]["torch_num_threads"] == 1


def test_make_reference_help_documents_the_pinned_commits():
    r = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    c = pins()
    for key in ("LLAMAGEN_REPO", "LLAMAGEN_COMMIT", "MGVQ_REPO", "MGVQ_COMMIT"):
        assert c[key] in r.stdout, key
    assert "--llamagen DIR" in r.stdout and "--mgvq DIR" in r.stdout


def test_make_reference_refuses_sources_that_are_not_the_pinned_commit(tmp_path):
    spec = importlib.util.spec_from_file_location("make_reference", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # stdlib only at import time
    (tmp_path / "empty").write_bytes(b"")
    assert mod.git_blob_id(tmp_path / "empty") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"  # git's empty blob
    (tmp_path / "utils").mkdir()
    (tmp_path / "utils" / "drop_path.py").write_text("# not the original\n")
    r = subprocess.run([sys.executable, str(SCRIPT), "--llamagen", str(tmp_path), "--mgvq", str(tmp_path),
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "is not the pinned commit" in r.stderr
    assert "utils/drop_path.py: blob" in r.stderr and "vq_model.py: missing" in r.stderr
    assert not (tmp_path / "out").exists()
