"""l4lab.tables.text_table: alignment, formats and the errors that name a bad column."""

from __future__ import annotations

import pytest

from l4lab.tables import text_table


def test_columns_aligned_numbers_right_text_left() -> None:
    table = text_table(
        [
            {"expert": 0, "name": "shared", "share": 0.25},
            {"expert": 12, "name": "e", "share": 0.125},
        ],
        formats={"share": "{:.1%}"},
    )
    assert table.splitlines() == [
        "expert | name   | share",
        "-------+--------+------",
        "     0 | shared | 25.0%",
        "    12 | e      | 12.5%",
    ]


def test_values_without_a_format() -> None:
    table = text_table([{"lengths": [1, 2], "loss": 0.5, "ok": True}])
    # bools are numbers to Python: right-aligned like the rest of a numeric column
    assert table.splitlines()[2] == "[1, 2]  |  0.5 | True"


def test_a_wider_cell_widens_its_column() -> None:
    rows = [{"n": 1}, {"n": 1_000_000}]
    assert text_table(rows, formats={"n": "{:,}"}).splitlines() == [
        "        n",
        "---------",
        "        1",
        "1,000,000",
    ]


def test_bad_rows_and_formats_are_named() -> None:
    with pytest.raises(ValueError, match="at least one row"):
        text_table([])
    with pytest.raises(ValueError, match=r"row 1 has the columns \['b'\]"):
        text_table([{"a": 1}, {"b": 2}])
    with pytest.raises(ValueError, match=r"no row has: \['shar'\]"):
        text_table([{"share": 0.5}], formats={"shar": "{:.1%}"})
