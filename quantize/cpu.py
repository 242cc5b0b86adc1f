"""What this machine's CPU makes ONNX Runtime's integer kernels do, read from /proc/cpuinfo."""

from __future__ import annotations

import platform
from functools import cache
from pathlib import Path


@cache
def int16_pair_sums() -> bool:
    """Whether ONNX Runtime's u8 x s8 kernels may add products in int16 pairs with saturation
    (VPMADDUBSW: x86 with AVX2 or AVX512BW and no VNNI, which accumulates in int32). True when
    the flags cannot be read on x86 (the safe side), False off x86 (no such kernel)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    line = next((x for x in text.splitlines() if x.startswith("flags")), None)
    if line is None:
        return True
    flags = set(line.split(":", 1)[1].split())
    if flags & {"avx512_vnni", "avx_vnni"}:
        return False
    return bool(flags & {"avx2", "avx512bw"})
