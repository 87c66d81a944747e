"""Markdown for the ``reproduce`` report: tables and number formats, every number from the runs."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def human_bytes(n: float) -> str:
    """``1536 -> '1.50 KiB'`` (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def plural(n: int, word: str) -> str:
    """``(1, 'layer') -> '1 layer'``, ``(2, 'layer') -> '2 layers'`` (nouns with a plain -s)."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def percent(x: float, digits: int = 1) -> str:
    """``0.4567 -> '45.7%'``."""
    return f"{100 * x:.{digits}f}%"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table; numbers right-aligned, text left-aligned."""
    if any(len(r) != len(headers) for r in rows):
        raise ValueError(f"every row needs {len(headers)} cells (one per header)")

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.4g}"
        return str(v).replace("|", "\\|")

    numeric = [
        all(isinstance(r[j], int | float) for r in rows) if rows else False
        for j in range(len(headers))
    ]
    sep = ["---:" if num else "---" for num in numeric]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def key_values(pairs: Mapping[str, Any]) -> str:
    """A two-column markdown table of settings."""
    return markdown_table(["setting", "value"], [[k, v] for k, v in pairs.items()])


def image(path: str, alt: str) -> str:
    """A markdown image line."""
    return f"![{alt}]({path})"
