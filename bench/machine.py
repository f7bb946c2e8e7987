"""The machine line every benchmark table carries: which of AVX2, AVX-512 and AMX the
CPU has (figures compare only between runs on machines with the same flags)."""

from __future__ import annotations

import re
from pathlib import Path

FLAGS = re.compile(r"\b(avx512[a-z_0-9]*|avx2|amx[a-z_0-9]*)\b")


def cpu_flags() -> str:
    """The CPU's avx2, avx512* and amx* flags, sorted and space-separated, or a note that
    it has none of them."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        return "(no /proc/cpuinfo)"
    return " ".join(sorted(set(FLAGS.findall(text)))) or "(none of avx2/avx512/amx)"
