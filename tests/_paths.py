"""Where the shared reference fixtures live: `<repo>/../shared` (this checkout and CI's clone both have it beside
the repo); MGVQ_SHARED_DIR overrides."""
import os
from pathlib import Path

SHARED = Path(os.environ.get("MGVQ_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
FIXTURES = SHARED / "fixtures" / "reference"
