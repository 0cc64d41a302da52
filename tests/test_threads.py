"""kdlab.threads: the torch pool is sized from the cores free now (issue 23, item 4)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from kdlab import threads


def test_a_busy_process_is_seen_as_running_elsewhere():
    """A busy loop is always runnable, so it is counted (other load may add to the count, never hide it)."""
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        seen = max(threads.running_elsewhere() for _ in range(20))
    finally:
        busy.kill()
    assert seen >= 1


@pytest.mark.parametrize("cpus, elsewhere, want", [(2, 0, 2), (2, 1, 1), (2, 5, 1), (8, 3, 5), (1, 0, 1)])
def test_free_cores(monkeypatch, cpus, elsewhere, want):
    monkeypatch.setattr(threads, "allowed_cpus", lambda: cpus)
    monkeypatch.setattr(threads, "running_elsewhere", lambda: elsewhere)
    assert threads.free_cores() == want


def test_choose_prefers_the_config_then_the_environment_then_the_free_cores(monkeypatch):
    monkeypatch.setattr(threads, "_torch_default", 4)
    monkeypatch.setattr(threads, "free_cores", lambda: 3)
    monkeypatch.delenv(threads.ENV, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads.choose(None) == 3
    monkeypatch.setattr(threads, "free_cores", lambda: 16)
    assert threads.choose(None) == 4  # never more than torch's own default (the physical cores)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.choose(None) == 2
    monkeypatch.setenv(threads.ENV, "3")
    assert threads.choose(None) == 3
    assert threads.choose(7) == 7


def test_apply_sets_torch(monkeypatch):
    import torch

    old = torch.get_num_threads()
    try:
        monkeypatch.setattr(threads, "choose", lambda t: 1)
        assert threads.apply(None) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(old)
