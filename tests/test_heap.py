"""The compact heap ``emloc`` commands relaunch with (glibc tunables) and when a budget still needs the small
heap."""
import subprocess
import sys

import pytest

from emloc import heap

OURS = ":".join(f"{key}={value}" for key, value in heap.COMPACT_HEAP_TUNABLES.items())
glibc_only = pytest.mark.skipif(not heap._is_glibc(), reason="glibc tunables")


@glibc_only
def test_relaunch_environment_adds_the_tunables_after_the_users():
    assert heap.compact_heap_environment({})["GLIBC_TUNABLES"] == OURS
    mine = heap.compact_heap_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=1", "HOME": "x"})
    assert mine == {"GLIBC_TUNABLES": f"glibc.malloc.arena_max=1:{OURS}", "HOME": "x"}


@glibc_only
def test_no_relaunch_when_set_opted_out_or_user_chose_a_value():
    assert heap.compact_heap_environment({"GLIBC_TUNABLES": OURS}) is None
    assert heap.compact_heap_environment({heap.OPT_OUT: "1"}) is None
    # a user's own value for one of our tunables wins; only the missing one is added
    chosen = heap.compact_heap_environment({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=7"})
    assert chosen["GLIBC_TUNABLES"] == "glibc.malloc.tcache_count=7:glibc.malloc.mxfast=0"


def test_no_relaunch_off_glibc(monkeypatch):
    monkeypatch.setattr(heap, "_is_glibc", lambda: False)
    assert heap.compact_heap_environment({}) is None


@glibc_only
def test_relaunch_keeps_the_process_and_its_arguments():
    code = ("import os, sys; print(os.getpid(), sys.argv[1:], os.environ.get('GLIBC_TUNABLES'), flush=True); "
            "from emloc.heap import relaunch_with_compact_heap as r, compact_heap_active as a; r(); "
            "print('active', a())")
    env = {key: value for key, value in __import__("os").environ.items()
           if key not in ("GLIBC_TUNABLES", heap.OPT_OUT)}
    lines = subprocess.run([sys.executable, "-c", code, "an argument"], env=env, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    first, second = lines[0].split(" ", 1), lines[1].split(" ", 1)
    assert first[0] == second[0], "the relaunch is an exec: same process id"
    assert first[1] == "['an argument'] None" and second[1] == f"['an argument'] {OURS}"
    assert lines[2:] == ["active True"]


def test_a_budget_needs_the_small_heap_only_without_the_compact_one(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert heap.small_heap_for_budget(None) is False
    assert heap.small_heap_for_budget("inference") is True
    monkeypatch.setenv("GLIBC_TUNABLES", OURS)
    assert heap.small_heap_for_budget("inference") is False
