"""Imported by every benchmark before the packages it measures: this checkout's `verifier` and
`quantize` come first, for the benchmark and for the processes it starts (`verify` runs, Dask
workers), whatever copy is installed. So two checkouts side by side each measure their own
code, not both the installed one."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

if sys.path[:1] != [str(ROOT)]:
    sys.path.insert(0, str(ROOT))
_others = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(ROOT)]
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *_others])
