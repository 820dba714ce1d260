"""Configs side by side and parameters by part, against the published configs and a hand formula."""

from __future__ import annotations

import pytest
import torch

import l4lab
from l4lab.compare import attention_pattern, config_table, ffn_pattern, moe_dispatch_flops, parameters_by_part


def test_layer_patterns_of_the_published_models() -> None:
    assert attention_pattern(l4lab.preset("llama4-scout")) == "cccNcccN"
    assert attention_pattern(l4lab.preset("llama3-8b")) == "RRRRRRRR"
    assert ffn_pattern(l4lab.preset("llama4-scout")) == "MMMMMMMM"
    assert ffn_pattern(l4lab.preset("llama4-maverick")) == "DMDMDMDM"
    assert ffn_pattern(l4lab.preset("llama2-7b")) == "DDDDDDDD"


def test_config_table_lists_what_differs_in_columns_and_what_is_shared_once() -> None:
    table = config_table(
        {"Llama 3": l4lab.preset("llama3-8b"), "Scout": l4lab.preset("llama4-scout")}, width=12
    )
    rows = {line[:27].strip(): line[27:].split() for line in table.splitlines()[1:] if line[:27].strip()}
    assert table.splitlines()[0].split() == ["Llama", "3", "Scout"]
    assert rows["layers"] == ["32", "48"]
    assert rows["QK norm"] == ["no", "yes"]
    assert rows["layers 0-7 attention"] == ["RRRRRRRR", "cccNcccN"]
    assert rows["chunk size"] == ["-", "(global)", "8,192"]
    shared = table.split("the same in all: ")[1]
    assert "RoPE theta 500,000" in shared and "head dim 128" in shared and "RMS eps 1e-05" in shared
    assert "\nRoPE scaling               Llama 3: none; Scout: x16 past 8,192\n" in table  # too wide: a line
    with pytest.raises(ValueError, match="configs is empty"):
        config_table({})


@pytest.mark.parametrize("name", ["tiny-moe", "llama4-maverick"])
def test_parameters_by_part_equal_the_formula(name: str) -> None:
    c = l4lab.preset(name, vision=None)  # the text model, as l4lab.Llama4 builds it
    plan = c.layer_plan()
    moe = sum(s.moe for s in plan)
    d, expert = c.hidden_size, 3 * c.hidden_size * c.moe_intermediate_size
    formula = {
        "embeddings + head": 2 * c.vocab_size * d,
        "attention": c.num_layers * d * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads),
        "dense FFN": (c.num_layers - moe) * 3 * d * c.dense_intermediate_size,
        "shared experts": moe * expert,
        "routed experts": moe * c.num_experts * expert,
        "norms + routers": (2 * c.num_layers + 1) * d + moe * d * c.num_experts,
    }
    with torch.device("meta"):
        model = l4lab.Llama4(c)
    assert parameters_by_part(model) == {part: n for part, n in formula.items() if n}
    assert sum(parameters_by_part(model).values()) == l4lab.count_params(c)[0]


@pytest.mark.parametrize("num_experts", [1, 4, 16])
def test_moe_dispatch_flops_against_the_formula(num_experts: int) -> None:
    """Per token, top-1: l4lab runs the shared and one routed SwiGLU (3 products of D x F each) plus the
    router (D x E); transformers runs all E routed experts, the shared one and the router."""
    config = l4lab.preset("tiny-moe", num_experts=num_experts)
    tokens = torch.randn(64, config.hidden_size, generator=torch.Generator().manual_seed(0))
    flops = moe_dispatch_flops(config, tokens)
    n, d, f, e = 64, config.hidden_size, config.moe_intermediate_size, num_experts
    swiglu = 2 * n * 3 * d * f  # 2 FLOPs per multiply-add, three D x F products per SwiGLU
    router = 2 * n * d * e
    assert flops["l4lab"] == 2 * swiglu + router
    assert flops["transformers"] == (1 + e) * swiglu + router
    assert flops["same_output"] is True
