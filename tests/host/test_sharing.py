"""What the master gives back before fork: the library pages it read but never wrote."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from serving.host.sharing import _clean_file_mappings

SMAPS = """\
7f0000000000-7f0000004000 r--p 00000000 fd:01 11 /usr/lib/libclean.so
Rss:                  16 kB
Anonymous:             0 kB
7f0000004000-7f0000008000 r--p 00004000 fd:01 11 /usr/lib/librelro.so
Rss:                  16 kB
Anonymous:             8 kB
7f0000008000-7f000000c000 rw-p 00008000 fd:01 11 /usr/lib/libdata.so
Anonymous:             0 kB
7f000000c000-7f0000010000 r-xp 00000000 00:00 0
Anonymous:             0 kB
7f0000010000-7f0000014000 ---p 00000000 fd:01 12 /usr/lib/libguard.so
Anonymous:             0 kB
7f0000014000-7f0000018000 r-xp 00000000 fd:01 13 /usr/lib/libcode.so (deleted)
Anonymous:             0 kB
"""


def test_only_readable_unwritten_file_mappings_without_copied_pages_are_dropped(tmp_path: Path) -> None:
    smaps = tmp_path / "smaps"
    smaps.write_text(SMAPS)
    # relocated (copied) pages, writable data, anonymous memory and guard pages are never dropped
    assert _clean_file_mappings(str(smaps)) == [
        (0x7F0000000000, 0x7F0000004000),
        (0x7F0000014000, 0x7F0000018000),
    ]


PROBE = """
import numpy as np
from serving.host.sharing import page_out_libraries

def resident(library):
    # kB resident of the library's code: never written, so never copied
    total, current = 0, ""
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if not fields[0].endswith(":"):
            current = fields[5] if len(fields) > 5 and fields[1] == "r-xp" else ""
        elif fields[0] == "Rss:" and library in current:
            total += int(fields[1])
    return total

before = resident("libscipy_openblas")
dropped = page_out_libraries()
after = resident("libscipy_openblas")
# the process runs on, and the library still computes right when its pages come back
product = np.ones((64, 64)) @ np.ones((64, 64))
print(before, after, dropped, int(product[0, 0]))
"""


def test_the_pages_leave_this_process_and_the_code_still_runs() -> None:
    # one BLAS thread: an idle pool thread of OpenBLAS, woken while the pages are counted, faults some back
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=True,
                         env=env)
    before, after, dropped, value = (int(part) for part in out.stdout.split())
    assert before > 0 and dropped > 0
    assert after < before / 4, (before, after)
    assert value == 64
