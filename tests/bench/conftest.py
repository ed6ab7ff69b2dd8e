"""The benchmark package lives at the repository root (``bench/``), outside the installed
``virtfleet`` package: make it importable for these tests."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
