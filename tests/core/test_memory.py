"""return_freed_memory: applied on glibc (in a child process, so this test process keeps glibc's defaults)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

CHILD = """
import resource, sys
import torch
from tessera.core.memory import return_freed_memory

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

first = return_freed_memory() if sys.argv[1] == "on" else False
again = return_freed_memory() if sys.argv[1] == "on" else False
warm = torch.ones(4 * 1024 * 1024)  # a freed 16 MiB mapping: glibc's adaptive threshold rises to 16 MiB
del warm
# 64 tensors of 4 MiB between small ones that stay: from the heap, freeing them leaves holes glibc keeps; with the
# threshold fixed at 1 MiB each was its own mapping and is returned at once
before = rss()
xs, keep = [], []
for _ in range(64):
    xs.append(torch.ones(1024 * 1024))
    keep.append(torch.ones(16 * 1024))
held = rss()
del xs
after = rss()
print(first, again, (held - before) >> 20, (held - after) >> 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_tensors_go_back_to_the_os() -> None:
    def run(mode: str) -> tuple[str, str, int, int]:
        out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True,
                             timeout=120)
        first, again, grew, returned = out.stdout.split()
        return first, again, int(grew), int(returned)

    first, again, grew, returned = run("on")
    assert first == again == "True"
    assert grew >= 250 and returned >= grew - 16  # 256 MiB held, (almost) all of it returned on free
    _, _, grew, returned = run("off")  # the oracle: glibc's defaults keep most of it
    assert grew >= 250 and returned < grew // 2
