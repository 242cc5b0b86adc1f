"""The benchmarks measure the checkout they sit in."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_benchmarks_import_their_own_checkout(tmp_path):
    """A benchmark imports the checkout it sits in, and hands it to the processes it starts,
    not the installed copy: two checkouts run side by side measure their own code."""
    other = tmp_path / "other"
    (other / "benchmarks").mkdir(parents=True)
    (other / "verifier").mkdir()
    (other / "verifier" / "__init__.py").write_text("")
    shutil.copy(ROOT / "benchmarks" / "checkout.py", other / "benchmarks" / "checkout.py")
    probe = other / "benchmarks" / "probe.py"
    probe.write_text(
        "import checkout, subprocess, sys, verifier\n"
        "print(verifier.__file__)\n"
        "sub = [sys.executable, '-c', 'import verifier; print(verifier.__file__)']\n"
        "print(subprocess.run(sub, capture_output=True, text=True, cwd='/').stdout.strip())\n"
    )
    out = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True, check=True)
    mine, child = out.stdout.split()
    assert Path(mine).parent == other / "verifier"
    assert Path(child).parent == other / "verifier"
