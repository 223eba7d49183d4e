"""The agent's allocator setting: big buffers freed go back to the system (core/memory.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from healthmesh.core.memory import tune_allocator
from tests.conftest import ROOT, require

#: Allocates and frees an 8 MiB buffer twice, as each round's JSON encoding does, and prints
#: the RSS growth left after the second free (MiB).
CHURN = """
import json, sys
from healthmesh.core.memory import tune_allocator
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
tuned = tune_allocator() if sys.argv[1] == "tuned" else False
base = rss()
for _ in range(2):
    buf = b"x" * (8 << 20)
    del buf
print(json.dumps({"tuned": tuned, "left_mb": rss() - base}))
"""


def churn(mode: str, env: dict[str, str] | None = None) -> dict[str, float]:
    proc = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_freed_encodings_leave_the_rss_only_with_the_fixed_threshold() -> None:
    require(None if sys.platform.startswith("linux") else "needs Linux with glibc")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    tuned = churn("tuned", env)
    assert tuned["tuned"] is True
    assert tuned["left_mb"] < 2.0, tuned
    # glibc's default: the second buffer comes from the heap and stays in the RSS when freed.
    assert churn("default", env)["left_mb"] > 6.0


def test_an_operators_malloc_setting_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert tune_allocator() is False


#: Fills the C heap with 80 MB of 2 KB blocks (below the mmap threshold, as the API's old
#: per-node fragments were), frees all but every 64th one, so the heap's top stays in use and
#: glibc cannot shrink it on its own, and prints the RSS before and after the release.
HOLES = """
import json
from healthmesh.core.memory import release_free_memory, tune_allocator
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
tune_allocator()
blocks = [bytes(2000) + bytes([i % 251]) for i in range(40_000)]
kept = blocks[::64]
del blocks
before = rss()
done = release_free_memory()
print(json.dumps({"done": done, "before": before, "after": rss(), "kept": len(kept)}))
"""


def test_free_pages_in_the_heap_go_back_to_the_system() -> None:
    require(None if sys.platform.startswith("linux") else "needs Linux with glibc")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    proc = subprocess.run([sys.executable, "-c", HOLES], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["done"] is True
    # ≈ 78 MB of the 80 are free space between kept blocks: most of it is released.
    assert got["before"] - got["after"] > 40, got
