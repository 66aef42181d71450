"""The CPU a ranker is measured on: its model name and the SIMD flags int8 kernels depend on.

onnxruntime's int8 matmuls (MLAS) take different code paths with and without VNNI
(``avx512_vnni`` / ``avx_vnni``): without it, u8s8 pair sums can saturate int16 (see
:class:`~slimrank.compression.quantize.QuantConfig`) and the int8 speed-up is smaller. A
latency chosen on one CPU is only a claim about that CPU, so reports name it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CPUINFO = Path("/proc/cpuinfo")
PROC_STAT = Path("/proc/stat")


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


@dataclass(frozen=True)
class CpuTimes:
    """The machine's CPU time so far, all CPUs together, in clock ticks: ``total`` counts user,
    nice, system, idle, iowait, irq, softirq and steal; ``steal`` is the part the hypervisor
    gave to other guests while this one had work to run."""

    total: int
    steal: int


def parse_proc_stat(text: str) -> CpuTimes:
    """The ``cpu`` line (all CPUs) of a ``/proc/stat`` text.

    Raises ValueError when there is no such line or it has fewer than the eight fields up to
    steal (kernels before 2.6.11).
    """
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            if len(fields) < 9:
                raise ValueError(f"/proc/stat's cpu line has no steal field: {line!r}")
            ticks = [int(x) for x in fields[1:9]]  # guest time is already inside user
            return CpuTimes(total=sum(ticks), steal=ticks[7])
    raise ValueError("/proc/stat has no 'cpu' line")


def cpu_times(path: Path = PROC_STAT) -> CpuTimes | None:
    """The machine's CPU times now; None where ``/proc/stat`` cannot be read (not Linux)."""
    try:
        return parse_proc_stat(path.read_text())
    except (OSError, ValueError):
        return None


def steal_share(before: CpuTimes | None, after: CpuTimes | None) -> float | None:
    """The share of all CPU time between two readings that the hypervisor stole (0 to 1);
    None when either reading is missing or no time passed between them."""
    if before is None or after is None or after.total <= before.total:
        return None
    return (after.steal - before.steal) / (after.total - before.total)
