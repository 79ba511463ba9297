"""The one Markdown table writer of the project (comparison, paper tables, subspace report, benchmark)."""
from __future__ import annotations

from collections.abc import Callable, Sequence

_RULES = {None: "---", "l": ":---", "r": "---:"}


def markdown_table(columns: Sequence, rows: Sequence[Sequence], cell: Callable[[object], str] = str,
                   align: Sequence[str | None] | None = None) -> str:
    """A GitHub-flavoured Markdown table. ``cell`` formats each value (header included); ``align``
    gives "l", "r" or None per column."""
    rules = [_RULES[a] for a in (align or [None] * len(columns))]
    lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + "|".join(rules) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
