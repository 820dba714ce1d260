"""Figures for looking inside Llama 4: routing, attention, temperature, memory, parameters, training.

Every function here is pure: it takes tensors or numbers and returns a ``plotly.graph_objects.Figure``
(or, for the numbers behind a figure, a plain dict or tensor). Nothing is displayed and no widget is
created; in a notebook, the figure shows itself when it is the last expression of a cell, and
``fig.write_html(...)`` or ``fig.write_image(...)`` saves it. Figures are deterministic (the same inputs
give the same JSON) and share one template, so they look alike side by side.

=================================  ==================================================================
routing                            :func:`expert_load_figure`, :func:`token_expert_figure`,
                                   :func:`specialisation_figure`, :func:`routing_stats_table`
attention                          :func:`attention_map_figure`, :func:`attention_distance_figure`
                                   (numbers: :func:`attention_mass_by_distance`,
                                   :func:`attention_row_entropy`),
                                   :func:`temperature_figure`
long context                       :func:`accuracy_vs_length_figure`, :func:`needle_heatmap`,
                                   :func:`kv_cache_figure` (numbers: :func:`kv_cache_memory`),
                                   :func:`cache_trace_figure`, :func:`table11_figure`,
                                   :func:`prefill_cost_figure`, :func:`passkey_grid_figure`,
                                   :func:`needle_mass_figure`, :func:`entropy_beside_yang_figure`
models and training                :func:`parameter_table`, :func:`loss_curves_figure`
experiments                        :func:`seed_spread_figure` (numbers: :func:`seed_statistics`),
                                   :func:`decode_time_figure`
architecture                       :func:`layer_stack_figure`, :func:`decoder_layer_figure`,
                                   :func:`moe_block_figure` (all drawn from ``layer_plan()``)
kernels                            :func:`attention_tiles_figure`, :func:`moe_tiles_figure`,
                                   :func:`benchmark_figure` (numbers: :func:`benchmark_rows`)
expert parallelism                 :func:`traffic_figure`, :func:`rank_wait_figure`, :func:`plan_figure`,
                                   :func:`ep_cost_figure`
multimodal                         :func:`tiles_figure`, :func:`patches_figure`, :func:`parameters_figure`
                                   (numbers: :func:`parameter_parts`; text: :func:`layout_summary`),
                                   :func:`fusion_accuracy_figure`, :func:`modality_routing_figure`,
                                   :func:`grounding_figure` (numbers: :func:`image_attention`)
the herd and its rivals            :func:`family_table_figure`, :func:`toggle_steps_figure`,
                                   :func:`router_comparison_figure`, :func:`same_expert_figure`,
                                   :func:`distillation_figure`
=================================  ==================================================================

Modules: ``common`` (template, colours, layout helpers), ``routing``, ``attention``,
``long_context``, ``models`` (parameters and training), ``experiments`` (seeds, timings),
``architecture``, ``kernels``, ``multimodal``, ``herd``, ``distributed`` (expert parallelism): one
module per topic of the table above. Everything public is re-exported here, so
``viz.expert_load_figure`` is ``viz.routing.expert_load_figure``. A new figure goes into the module of
its topic (or a new module) and gets a line in the table.
"""

from __future__ import annotations

from l4lab.viz.architecture import KIND_COLOURS, decoder_layer_figure, layer_stack_figure, moe_block_figure
from l4lab.viz.attention import (
    attention_distance_figure,
    attention_map_figure,
    attention_mass_by_distance,
    attention_row_entropy,
    temperature_figure,
)
from l4lab.viz.common import (
    COLOURS,
    FONT,
    TEMPLATE,
    expert_colours,
    layer_label,
)
from l4lab.viz.distributed import ep_cost_figure, plan_figure, rank_wait_figure, traffic_figure
from l4lab.viz.experiments import decode_time_figure, seed_spread_figure, seed_statistics
from l4lab.viz.herd import (
    MIXTRAL_CHANCE,
    MIXTRAL_SAME_EXPERT,
    distillation_figure,
    family_table_figure,
    router_comparison_figure,
    same_expert_figure,
    toggle_steps_figure,
)
from l4lab.viz.kernels import (
    TILE_COLOURS,
    TILE_KINDS,
    attention_tiles_figure,
    benchmark_figure,
    benchmark_rows,
    moe_tiles_figure,
)
from l4lab.viz.long_context import (
    accuracy_vs_length_figure,
    cache_trace_figure,
    entropy_beside_yang_figure,
    kv_cache_figure,
    kv_cache_memory,
    needle_heatmap,
    needle_mass_figure,
    passkey_grid_figure,
    prefill_cost_figure,
    table11_figure,
)
from l4lab.viz.models import loss_curves_figure, parameter_table
from l4lab.viz.multimodal import (
    fusion_accuracy_figure,
    grounding_figure,
    image_attention,
    layout_summary,
    modality_routing_figure,
    parameter_parts,
    parameters_figure,
    patches_figure,
    tile_pictures,
    tiles_figure,
)
from l4lab.viz.routing import (
    ROUTING_REFERENCES,
    expert_load_figure,
    routing_stats_table,
    specialisation_figure,
    token_expert_figure,
)

__all__ = [
    "COLOURS",
    "FONT",
    "KIND_COLOURS",
    "MIXTRAL_CHANCE",
    "MIXTRAL_SAME_EXPERT",
    "ROUTING_REFERENCES",
    "TEMPLATE",
    "TILE_COLOURS",
    "TILE_KINDS",
    "accuracy_vs_length_figure",
    "attention_distance_figure",
    "attention_map_figure",
    "attention_mass_by_distance",
    "attention_row_entropy",
    "attention_tiles_figure",
    "benchmark_figure",
    "benchmark_rows",
    "cache_trace_figure",
    "decode_time_figure",
    "decoder_layer_figure",
    "distillation_figure",
    "entropy_beside_yang_figure",
    "ep_cost_figure",
    "expert_colours",
    "expert_load_figure",
    "family_table_figure",
    "fusion_accuracy_figure",
    "grounding_figure",
    "image_attention",
    "kv_cache_figure",
    "kv_cache_memory",
    "layer_label",
    "layer_stack_figure",
    "layout_summary",
    "loss_curves_figure",
    "modality_routing_figure",
    "moe_block_figure",
    "moe_tiles_figure",
    "needle_heatmap",
    "needle_mass_figure",
    "parameter_parts",
    "parameter_table",
    "parameters_figure",
    "passkey_grid_figure",
    "patches_figure",
    "plan_figure",
    "prefill_cost_figure",
    "rank_wait_figure",
    "router_comparison_figure",
    "routing_stats_table",
    "same_expert_figure",
    "seed_spread_figure",
    "seed_statistics",
    "specialisation_figure",
    "table11_figure",
    "temperature_figure",
    "tile_pictures",
    "tiles_figure",
    "toggle_steps_figure",
    "token_expert_figure",
    "traffic_figure",
]
