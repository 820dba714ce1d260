"""The machine a benchmark ran on, for the header of its results: CPU model, cores, kernels, versions.

Imported by the scripts beside it (``python benchmarks/x.py`` puts this folder on ``sys.path``).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, or what ``platform`` knows elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine() -> dict[str, str]:
    """CPU, cores, the best ATen kernels this CPU runs, and the torch and Python versions."""
    import torch  # here, so that cpu_model() serves scripts that do not import torch

    return {
        "cpu": cpu_model(),
        "cores": str(os.cpu_count()),
        "best ATen kernels": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
