"""What the benchmarks share: peak-memory measurement through /proc, the machine's description, and replacing
one benchmark's section of bench/RESULTS.md."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def status_mib(field: str) -> float:
    """A /proc/self/status field (VmRSS, VmHWM, ...) in MiB."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> float:
    """Reset the peak resident set (VmHWM) to the current one; returns the current resident set (MiB). The
    peak extra memory of what follows is then ``status_mib("VmHWM") - reset_peak()``'s value."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_mib("VmRSS")


def machine() -> dict:
    """CPU model (lscpu), cores, memory, Python and torch versions."""
    import torch

    model = "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = re.search(r"Model name:\s*(.+)", out).group(1).strip()
    except Exception:  # lscpu missing: keep "unknown"
        pass
    mem = re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gib": int(mem.group(1)) / 2**20 if mem else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def write_section(heading: str, text: str) -> None:
    """Replace the section of bench/RESULTS.md that starts with ``heading`` (up to the next ``## ``) by
    ``text``, or append it."""
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    section = text.rstrip("\n") + "\n"
    pattern = re.compile(re.escape(heading) + r".*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(old):
        new = pattern.sub(lambda _: section + "\n", old, count=1).rstrip("\n") + "\n"
    else:
        new = old.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(new)
