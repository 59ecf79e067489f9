"""The machine a run measured on: CPU, memory, GPU, versions, threads and load average."""

from __future__ import annotations

import os
import platform
from typing import Any

import torch

__all__ = ["loadavg", "machine"]


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages, or ``n/a``."""
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def _cpu_name() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return cpu


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            return int(f.readline().split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        return None


def _gpu(device: str) -> tuple[str, dict[str, Any] | None]:
    """The device's one-line summary and, on CUDA, its properties."""
    if torch.device(device).type != "cuda":
        return "cpu", None
    props = torch.cuda.get_device_properties(torch.device(device))
    gpu = {
        "name": props.name,
        "memory_gib": props.total_memory / 2**30,
        "cuda": torch.version.cuda,
        "capability": f"{props.major}.{props.minor}",
    }
    summary = (
        f"{device}: {props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
    )
    return summary, gpu


def machine(before: str, device: str = "cpu") -> dict[str, Any]:
    """The ``meta.machine`` record of the results (``before``: the load average at the start)."""
    cpu = _cpu_name()
    ncpu = os.cpu_count()
    mem = _memory_gib()
    device_summary, gpu = _gpu(device)
    return {
        "device": device,
        "device_summary": device_summary,
        "gpu": gpu,
        "cpu": cpu,
        "cpu_count": ncpu,
        "memory_gib": mem,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "loadavg_before": before,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "summary": f"{cpu}, {ncpu} CPUs, {mem:.0f} GiB RAM, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}"
        if mem
        else f"{cpu}, {ncpu} CPUs, torch {torch.__version__}",
    }
