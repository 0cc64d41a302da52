"""How many CPU threads torch uses: the cores free when a process starts, not every core.

torch's intra-op pool defaults to every physical core and its OpenMP threads spin while they wait at a
barrier. Beside another CPU-bound process each parallel region then waits for the thread that lost its
core, and the spinning threads take the time the others need: the demo's stage-1 build took 636 s beside
one other run against 25 s alone on a 2-core machine (issue 23; bench/shared_machine.py measures it).
kdlab therefore sizes the pool from the cores that are free now: the CPUs this process may run on, less the
other processes runnable at this moment (/proc/loadavg's running count, which includes this one).
"""

from __future__ import annotations

import os

ENV = "KDLAB_THREADS"  # an explicit count for every kdlab process (as `threads:` does for one run)
_torch_default: int | None = None  # torch's own pool size, read before kdlab first changes it


def allowed_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def running_elsewhere() -> int:
    """Processes runnable right now besides this one (0 where /proc/loadavg is missing)."""
    try:
        running = int(open("/proc/loadavg").read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return 0
    return max(running - 1, 0)


def free_cores() -> int:
    """The CPUs this process may use, less those other runnable processes hold; at least 1."""
    return max(1, allowed_cpus() - running_elsewhere())


def choose(threads: int | None) -> int:
    """`threads` when given; else $KDLAB_THREADS; else $OMP_NUM_THREADS (the user's word, as torch reads
    it); else the free cores, at most torch's own default (the physical cores)."""
    import torch

    if threads:
        return threads
    for var in (ENV, "OMP_NUM_THREADS"):
        value = os.environ.get(var, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    global _torch_default
    if _torch_default is None:
        _torch_default = torch.get_num_threads()
    return max(1, min(free_cores(), _torch_default))


def apply(threads: int | None) -> int:
    """Set torch's intra-op threads by `choose` and return the count."""
    import torch

    n = choose(threads)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n

