"""Shared by the benchmarks: each owns one marked section of benchmarks/RESULTS.md, and some
read their own memory from /proc."""

from __future__ import annotations

from pathlib import Path


def write_section(path: Path, begin: str, end: str, lines: list[str]) -> None:
    """Replace the text between ``begin`` and ``end`` markers (appending the section when
    absent) and leave the other benchmarks' sections as they are."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    section = "\n".join([begin, *lines, end])
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def proc_status(field_name: str) -> int:
    """Bytes of one field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ``RssAnon``...), 0 if absent."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024
    return 0
