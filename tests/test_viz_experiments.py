"""Figures of measurements with their spread: the numbers inside them, against hand computations."""

from __future__ import annotations

import numpy as np
import pytest

from l4lab import viz

CURVES = {"0": [[50, 1.0], [100, 4.0]], "1": [[50, 3.0], [100, 2.0]], "2": [[50, 2.0], [100, 0.0]]}


def test_seed_statistics_by_hand() -> None:
    stats = viz.seed_statistics(CURVES)
    assert stats["step"].tolist() == [50, 100]
    assert stats["mean"].tolist() == [2.0, 2.0]
    assert stats["min"].tolist() == [1.0, 0.0] and stats["max"].tolist() == [3.0, 4.0]


def test_seed_statistics_refuses_seeds_measured_at_other_steps() -> None:
    with pytest.raises(ValueError, match="same steps"):
        viz.seed_statistics({"0": [[50, 1.0]], "1": [[60, 1.0]]})
    with pytest.raises(ValueError, match="at least one seed"):
        viz.seed_statistics({})


def test_seed_spread_figure_draws_band_seeds_and_mean_per_run() -> None:
    fig = viz.seed_spread_figure({"a": CURVES, "b": {"0": [[50, 9.0], [100, 9.0]]}}, "t", "y", zero_line="0")
    by_name = {trace.name: trace for trace in fig.data}
    band = by_name["a: min to max of 3 seeds"]
    assert list(band.x) == [50, 100, 100, 50] and list(band.y) == [3.0, 4.0, 0.0, 1.0]
    assert list(by_name["a: mean"].y) == [2.0, 2.0] and list(by_name["b: mean"].y) == [9.0, 9.0]
    assert list(by_name["a, seed 1"].y) == [3.0, 2.0]
    assert len(fig.data) == (1 + 3 + 1) + (1 + 1 + 1)  # per run: a band, each seed, the mean
    assert band.fillcolor != by_name["b: min to max of 1 seeds"].fillcolor
    assert [shape.y0 for shape in fig.layout.shapes] == [0.0]


def test_decode_time_figure_in_milliseconds_on_log_axes() -> None:
    fig = viz.decode_time_figure([16, 256], {"cached": [0.001, 0.002], "uncached": [0.01, 0.2]})
    uncached, cached = fig.data
    assert np.allclose(uncached.y, [10.0, 200.0]) and np.allclose(cached.y, [1.0, 2.0])
    assert list(cached.x) == [16, 256]
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"
