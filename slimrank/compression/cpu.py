"""The CPU a ranker is measured on: its model name and the SIMD flags int8 kernels depend on.

onnxruntime's int8 matmuls (MLAS) take different code paths with and without VNNI
(``avx512_vnni`` / ``avx_vnni``): without it, u8s8 pair sums can saturate int16 (see
:class:`~slimrank.compression.quantize.QuantConfig`) and the int8 speed-up is smaller. A
latency chosen on one CPU is only a claim about that CPU, so reports name it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

CPUINFO = Path("/proc/cpuinfo")


def parse_cpuinfo(text: str) -> tuple[str, set[str]]:
    """Return the first ``model name`` and ``flags`` of a ``/proc/cpuinfo`` text."""
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not model:
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return model, flags


def cpu_features(cpuinfo: Path = CPUINFO) -> dict[str, Any]:
    """Return ``{"model", "cpus", "flags", "vnni"}``: the SIMD flags that matter to FAISS and
    onnxruntime (AVX2, AVX-512*, VNNI), and whether int8 VNNI instructions are there.

    Without ``/proc/cpuinfo`` (not Linux) the model and flags are empty and ``vnni`` is None.
    """
    try:
        model, flags = parse_cpuinfo(cpuinfo.read_text())
    except OSError:
        return {"model": "", "cpus": os.cpu_count(), "flags": [], "vnni": None}
    wanted = sorted(f for f in flags if f == "avx2" or f.startswith("avx512") or f == "avx_vnni")
    vnni = "avx512_vnni" in flags or "avx_vnni" in flags
    return {"model": model, "cpus": os.cpu_count(), "flags": wanted, "vnni": vnni}
