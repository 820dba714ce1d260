"""The herd's figures: pure functions of the family table, the toggle steps and herd.json-shaped results."""

from __future__ import annotations

from l4lab import family, viz


def test_family_table_figure_has_a_row_per_model_and_no_invented_sizes() -> None:
    rows = family.family_table()
    table = viz.family_table_figure(rows).data[0]
    models, totals = table.cells.values[0], table.cells.values[3]
    assert list(models) == [row.model for row in rows]
    assert totals[models.index("gpt-4")] == "not published"
    assert totals[models.index("mixtral-8x7b")] == "46.7B"


def test_toggle_steps_figure_bars() -> None:
    steps = family.llama2_to_llama4()
    fig = viz.toggle_steps_figure(steps, 1_048_576)
    total, active, kv, flops = fig.data
    assert active.y[3] == active.y[4]  # top-2 = top-1 + shared in active width
    assert list(total.x) == [s.change for s in steps]
    assert kv.y[0] == 5 * kv.y[1]  # GQA: 40 -> 8 KV heads
    assert flops.y[-1] < flops.y[-3] / 2  # iRoPE: chunked attention at 1M tokens


RUN = {
    "val_loss": 2.0,
    "max_violation": [0.5, 0.3],
    "same_expert_rate": [0.2, 0.3],
    "chance_rate": [0.15, 0.2],
}


def test_router_comparison_figure_points_per_seed_and_means() -> None:
    routers = {"mixtral": {"runs": [RUN, {**RUN, "val_loss": 2.2}]}, "llama4": {"runs": [RUN]}}
    fig = viz.router_comparison_figure(routers)
    assert len(fig.data) == 3 * 2 * 2  # 3 panels x 2 routers x (seeds, mean)
    assert list(fig.data[0].y) == [2.0, 2.2] and fig.data[1].y[0] == 2.1
    assert abs(fig.data[9].y[0] - (0.25 - 0.175)) < 1e-12  # llama4's excess same-expert rate


def test_same_expert_figure_beside_the_published_numbers() -> None:
    fig = viz.same_expert_figure([0.2, 0.25], [0.15, 0.14], [0.13, 0.13])
    published = fig.data[0]
    assert [round(v, 1) for v in published.y] == [14.0, 27.9, 22.7]
    assert list(fig.data[2].x) == ["layer 0", "layer 1"]


def test_distillation_figure() -> None:
    fig = viz.distillation_figure({"alone": [2.0, 2.1], "fixed 0.5": [1.9, 1.95]}, teacher_loss=1.7)
    assert [trace.name for trace in fig.data] == [
        "alone (each seed)",
        "alone (mean)",
        "fixed 0.5 (each seed)",
        "fixed 0.5 (mean)",
    ]
