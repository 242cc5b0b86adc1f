"""Shared fixtures: where the real data lives, tiny generated models, and the reference
records of an uninterrupted run that the fault and cluster tests compare against."""

from __future__ import annotations

import json
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


def decisions(run_dir: Path, drop: tuple[str, ...] = ("seconds",)) -> list[dict]:
    """Per-input records of results.json without timing fields (`drop`): what must not change."""
    doc = json.loads((run_dir / "results.json").read_text())

    def strip(o):
        return None if o is None else {k: v for k, v in o.items() if k not in drop}

    return [
        {
            **r,
            "float": strip(r["float"]),
            "quantized": {k: strip(v) for k, v in r["quantized"].items()},
        }
        for r in doc["records"]
    ]


@pytest.fixture(scope="module")
def reference(request, base, tmp_path_factory) -> list[dict]:
    """The decisions of an uninterrupted in-process run (--workers 1) of the test module's
    `base` arguments, over its first `N` inputs."""
    from verifier.cli import main

    out = tmp_path_factory.mktemp("ref") / "run"
    assert main([str(a) for a in [*base, "--out", out]]) == 0
    got = decisions(out)
    assert [r["index"] for r in got] == list(range(request.module.N))
    assert any(r["quantized"] for r in got), "no quantized decisions to compare"
    return got
