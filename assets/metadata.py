"""Helpers that turn results into Dagster metadata a person reads at a glance."""

from __future__ import annotations

import base64
from typing import Iterable, Sequence

import dagster as dg


def md_image(png: bytes, alt: str = "preview") -> str:
    """Markdown with the image inlined, so the Dagster UI shows it without a file server."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"


def md_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        lines.append("| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |")
    return "\n".join(lines)


def md(text: str) -> dg.MetadataValue:
    return dg.MetadataValue.md(text)
