"""Where the reference fixtures live: tests/fixtures/reference/ in this repository, made from the original LlamaGen /
MGVQ code by tests/fixtures/make_reference.py (pinned commits, command and sha256 list in the README there), so every
clone has them. MGVQ_REFERENCE_FIXTURES=DIR makes the tests read another folder with the same files instead (e.g. a
regenerated set); nothing outside the repository is read otherwise."""
import os
from pathlib import Path

IN_REPO = Path(__file__).resolve().parent / "fixtures" / "reference"
FIXTURES = Path(os.environ.get("MGVQ_REFERENCE_FIXTURES") or IN_REPO)
