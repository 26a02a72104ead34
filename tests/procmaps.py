"""Test helper: which file backs a given address in this process (``/proc/self/maps``)."""

from __future__ import annotations


def mapping_of(address: int) -> str:
    """The file behind the mapping that holds ``address`` ("" for anonymous memory)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end:
                return fields[5].strip() if len(fields) > 5 else ""
    return ""
