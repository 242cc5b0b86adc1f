"""Shared fixtures: where the real data lives, and tiny generated models."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The real data folder from $RELROBUST_DATA (set by .ci/run); skipped when unset."""
    env = os.environ.get("RELROBUST_DATA")
    if not env:
        pytest.skip("RELROBUST_DATA is not set: integration test on real data not run")
    path = Path(env)
    assert path.is_dir(), f"RELROBUST_DATA={env} is not a directory"
    return path
