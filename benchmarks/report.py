"""Shared by the benchmark scripts: each regenerates its own marked section of docs/RESULTS.md."""

from __future__ import annotations

from pathlib import Path


def replace_section(doc: Path, key: str, text: str) -> None:
    """Put `text` (which starts with `<!-- key:begin -->` and ends with `<!-- key:end -->`) in place
    of that section of `doc`, or at its end."""
    body = doc.read_text() if doc.exists() else "# Results\n"
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    if begin in body:
        start, stop = body.index(begin), body.index(end) + len(end)
        body = body[:start] + text + body[stop:]
    else:
        body = body.rstrip() + "\n\n" + text + "\n"
    doc.write_text(body)
