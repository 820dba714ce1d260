"""Plain-text tables for notebook cells: columns aligned, numbers formatted per column.

A notebook cell should show the idea it is about, not twenty lines of f-strings that line up columns.
The cell builds its rows (one mapping per row, the same keys in every row) and prints them::

    print(text_table(rows, formats={"score": "{:.3f}", "share": "{:.1%}"}))

Column widths are those of the longest header or cell; numbers are right-aligned, text left-aligned;
a value with no format is shown with ``str`` (lists as ``[1, 2]``). The result is a string, so the same
rows give the same text on every machine whenever the values themselves are exact.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["text_table"]


def _cell(value: Any, fmt: str | None) -> str:
    if fmt is not None:
        return fmt.format(value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def text_table(rows: Sequence[Mapping[str, Any]], formats: Mapping[str, str] | None = None) -> str:
    """``rows`` as an aligned text table under a header of their keys, ``" | "`` between columns.

    ``formats`` maps a column to a ``str.format`` pattern (``"{:.2f}"``, ``"{:+.2f}"``, ``"{:.1%}"``,
    ``"{:,}"``). Every row must have the same keys, in the same order, and every key of ``formats`` must
    be a column: a mistyped name raises instead of silently printing unformatted numbers.
    """
    if not rows:
        raise ValueError("text_table needs at least one row")
    columns = list(rows[0])
    for index, row in enumerate(rows):
        if list(row) != columns:
            raise ValueError(f"row {index} has the columns {list(row)}, the first row {columns}")
    formats = dict(formats or {})
    unknown = sorted(set(formats) - set(columns))
    if unknown:
        raise ValueError(f"formats for columns that no row has: {unknown} (columns: {columns})")
    cells = [[_cell(row[column], formats.get(column)) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]
    numeric = [all(isinstance(row[column], numbers.Number) for row in rows) for column in columns]

    def line(values: Sequence[str]) -> str:
        parts = [
            value.rjust(width) if right else value.ljust(width)
            for value, width, right in zip(values, widths, numeric, strict=True)
        ]
        return " | ".join(parts).rstrip()

    header = line(columns)
    rule = "-+-".join("-" * width for width in widths)
    return "\n".join([header, rule, *(line(values) for values in cells)])
