"""Explorers for notebooks: pick a layer, a head, a position scheme, and watch the figure change.

Each explorer is a thin shell of ipywidgets controls around a plain function that returns a plotly
Figure, and all the logic lives in those functions, so they can be tested and used without a widget:

==========================  =====================================================================
function                    what it draws
==========================  =====================================================================
:func:`routing_view`        the text, each token coloured by the expert one MoE layer sends it to
:func:`attention_view`      one head's attention map, under any positions / chunk / temperature
==========================  =====================================================================

:func:`routing_explorer` and :func:`attention_explorer` wire controls to them. On every change the
explorer builds a fresh ``go.Figure`` and shows it in a ``widgets.Output`` (no ``go.FigureWidget``: that
needs the ``anywidget`` package). The explorer returned is an :class:`Explorer`, a ``VBox`` that also
keeps its current figures as plain plotly Figures (``explorer.figure``) and puts them in its display
bundle as plotly JSON beside the widget view, so a static page such as the book, where no kernel runs
the callbacks, can still show the last state.

Everything works headless too (in pytest the widgets' comm falls back to a dummy): setting a control's
``.value`` runs the callbacks at once, and ``explorer.figure`` changes with it::

    explorer = attention_explorer({"MoE": moe_model, "dense": dense_model}, tokens)
    explorer.controls["positions"].value = "rope"  # re-renders
    explorer.figure.layout.title.text  # 'MoE · Layer 0 (RoPE, global), head 0, ...'

The attention explorer changes weightless settings of a trained model (``Llama4.reconfigure``: iRoPE or
RoPE, chunk size, temperature tuning) only for the forward pass it draws, inside :func:`reconfigured`,
which puts the model's own configuration back afterwards, even when the forward pass fails.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import ipywidgets as widgets
import plotly.graph_objects as go
import plotly.io as pio
import torch
from torch import Tensor

from l4lab import viz
from l4lab.model import Llama4, Llama4Output
from l4lab.routing import expert_load
from l4lab.tokenizer import ByteTokenizer

PLOTLY_MIMETYPE = "application/vnd.plotly.v1+json"
FIGURES_MIMETYPE = "application/vnd.l4lab.figures+json"  # every figure of an Explorer, for static pages

__all__ = [
    "Explorer",
    "attention_explorer",
    "attention_view",
    "chunk_size_choices",
    "reconfigured",
    "routing_explorer",
    "routing_view",
    "token_texts",
]


# ---------------------------------------------------------------------- helpers
def _check_tokens(tokens: Tensor) -> int:
    """The length T of ``tokens`` [1, T]: explorers look at one sequence."""
    if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.shape[0] != 1:
        shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
        raise ValueError(f"tokens must be one sequence of ids [1, T] (e.g. tokenizer(text)); got {shape}")
    return int(tokens.shape[1])


def token_texts(ids: Tensor | list[int], tokenizer: Any = None, vocab_size: int | None = None) -> list[str]:
    """Each token as text, one string per id, for labelling plots.

    ``tokenizer`` needs a ``decode(list_of_ids)``. Without one, ids are read as bytes when they fit the
    byte tokenizer (``vocab_size`` 260 or unknown and every id < 260), else shown as numbers. A single
    byte of a multi-byte character decodes to the replacement character ``"\\ufffd"``.
    """
    values = [int(i) for i in (ids.reshape(-1).tolist() if isinstance(ids, Tensor) else ids)]
    if tokenizer is None:
        byte_tokenizer = ByteTokenizer()
        fits = vocab_size == byte_tokenizer.vocab_size or (
            vocab_size is None and all(0 <= i < byte_tokenizer.vocab_size for i in values)
        )
        if not fits:
            return [str(i) for i in values]
        tokenizer = byte_tokenizer
    return [tokenizer.decode([i]) for i in values]


def _mime_bundle(fig: go.Figure) -> dict[str, Any]:
    """What a notebook would display for ``fig``: the default renderer's bundle, or plotly's JSON.

    Outside a notebook plotly's default renderer may be a browser, which has no bundle; then the
    figure goes out as ``application/vnd.plotly.v1+json``, which JupyterLab and VS Code draw.
    """
    bundle = dict(fig._repr_mimebundle_())
    if PLOTLY_MIMETYPE not in bundle and "text/html" not in bundle:
        bundle.update(pio.renderers["plotly_mimetype"].to_mimebundle(fig.to_dict()))
    bundle["text/plain"] = f"Figure: {fig.layout.title.text or ''}"
    return bundle


def _show(output: widgets.Output, fig: go.Figure) -> None:
    """Replace what ``output`` shows with ``fig`` (synchronous, also without a kernel)."""
    output.outputs = ({"output_type": "display_data", "data": _mime_bundle(fig), "metadata": {}},)


class Explorer(widgets.VBox):
    """Controls in a row, then one ``Output`` per figure; every control change redraws the figures.

    ``controls`` maps a name to a widget with a ``value`` (``explorer.controls["layer"].value = 3``);
    ``render()`` reads the controls and returns the figures by name, in display order. The current
    figures stay available as plain plotly Figures: ``explorer.figures`` (by name) and
    ``explorer.figure`` (the first one), e.g. for a static page.
    """

    def __init__(
        self,
        controls: Mapping[str, widgets.Widget],
        render: Callable[[], dict[str, go.Figure]],
        on_change: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__()
        self.controls: dict[str, widgets.Widget] = dict(controls)
        self.figures: dict[str, go.Figure] = {}
        self._render = render
        self._on_change = on_change
        self._held = False
        first = render()
        self.panels: dict[str, widgets.Output] = {name: widgets.Output() for name in first}
        self._display(first)
        row = widgets.HBox(list(self.controls.values()), layout=widgets.Layout(flex_flow="row wrap"))
        self.children = [row, *self.panels.values()]
        for name, control in self.controls.items():
            control.observe(lambda change, name=name: self._changed(name), names="value")

    @property
    def figure(self) -> go.Figure:
        """The first (main) figure as it is now."""
        return next(iter(self.figures.values()))

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        """The widget's usual bundle, plus its current figure(s) as plain plotly JSON.

        A front end with a widget manager (JupyterLab) shows the live widget; one without (a static
        page, the book, GitHub) can still draw the last state: ``application/vnd.plotly.v1+json``
        holds the first figure, and when there are several, ``application/vnd.l4lab.figures+json``
        holds them all, ``{"figures": [plotly JSON, ...]}`` in display order.
        """
        bundle = dict(super()._repr_mimebundle_(**kwargs) or {})
        renderer = pio.renderers["plotly_mimetype"]
        figures = [renderer.to_mimebundle(fig.to_dict())[PLOTLY_MIMETYPE] for fig in self.figures.values()]
        if figures:
            bundle[PLOTLY_MIMETYPE] = figures[0]
        if len(figures) > 1:
            bundle[FIGURES_MIMETYPE] = {"figures": figures}
        return bundle

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Change several controls without a redraw after each; one redraw at the end."""
        held, self._held = self._held, True
        try:
            yield
        finally:
            self._held = held
        if not held:
            self.refresh()

    def refresh(self) -> None:
        """Redraw every figure from the controls' current values."""
        self._display(self._render())

    def _display(self, figures: dict[str, go.Figure]) -> None:
        self.figures = figures
        for name, fig in figures.items():
            _show(self.panels[name], fig)

    def _changed(self, name: str) -> None:
        if self._held:
            return
        if self._on_change is not None:
            with self.hold():  # the hook may update other controls: redraw once, after it
                self._on_change(name)
        else:
            self.refresh()


# ---------------------------------------------------------------------- routing
def routing_view(
    output: Llama4Output, layer_position: int, token_texts: list[str], num_experts: int
) -> go.Figure:
    """Sequence 0 of a forward pass, each token on a cell coloured by its first-choice expert.

    ``output``: what ``model(tokens)`` returned; ``layer_position`` picks one of ``output.routing`` (the
    MoE layers in order: position 0 is the first MoE layer, whatever its layer index);
    ``token_texts``: the tokens as text (:func:`token_texts`). Long runs of one colour mean the router
    sends neighbouring tokens to the same expert: routing follows local structure, not the topic alone.
    """
    if not output.routing:
        raise ValueError("this output has no routing records: a dense model (ffn='dense') has no router")
    if not 0 <= layer_position < len(output.routing):
        layers = [record.layer for record in output.routing]
        raise ValueError(
            f"layer_position {layer_position} is out of range: the output has {len(layers)} MoE layers "
            f"(layers {layers}), so positions 0 to {len(layers) - 1}"
        )
    record = output.routing[layer_position]
    fig = viz.token_expert_figure(token_texts, record.experts[0, :, 0], num_experts)
    fig.update_layout(title_text=f"Layer {record.layer}: the expert each token goes to first")
    return fig


def _load_view(output: Llama4Output, layer_position: int, num_experts: int) -> go.Figure:
    record = output.routing[layer_position]
    fig = viz.expert_load_figure(expert_load(record, num_experts)[None], [record.layer])
    fig.update_layout(title_text=f"Layer {record.layer}: share of this text's tokens each expert receives")
    return fig


@torch.no_grad()
def routing_explorer(model: Llama4, tokens: Tensor, tokenizer: Any = None) -> Explorer:
    """A dropdown of the MoE layers ("layer i"); beneath it the tokens coloured by expert and the load.

    The model runs once on ``tokens`` [1, T]; the dropdown only picks which layer's routing to draw, so
    switching layers is instant. ``explorer.controls["layer"].value`` is a layer index.
    """
    _check_tokens(tokens)
    output = model(tokens)
    if not output.routing:
        raise ValueError("the model has no MoE layer (ffn='dense'): there is no routing to explore")
    num_experts = model.config.num_experts
    texts = token_texts(tokens[0], tokenizer, model.config.vocab_size)
    position_of = {record.layer: i for i, record in enumerate(output.routing)}
    layer = widgets.Dropdown(
        options=[(f"layer {index}", index) for index in position_of],
        value=output.routing[0].layer,
        description="MoE layer",
    )

    def render() -> dict[str, go.Figure]:
        position = position_of[layer.value]
        return {
            "tokens": routing_view(output, position, texts, num_experts),
            "load": _load_view(output, position, num_experts),
        }

    return Explorer({"layer": layer}, render)


# ---------------------------------------------------------------------- attention
@contextmanager
def reconfigured(model: Llama4, **changes: Any) -> Iterator[Llama4]:
    """Run a block with weightless settings of ``model`` changed, then put the old ones back.

    ``changes`` are ``Llama4.reconfigure`` fields (``positions``, ``attention_chunk_size``,
    ``temperature_tuning``, ...). The old values are restored on leaving the block, also when it
    raises, so ``model.config`` afterwards equals the config before::

        with reconfigured(model, positions="rope"):
            out = model(tokens, return_attention=True)
    """
    previous = model.config
    model.reconfigure(**changes)  # validates first: on a bad value nothing has changed yet
    try:
        yield model
    finally:
        model.reconfigure(**{name: getattr(previous, name) for name in changes})


@torch.no_grad()
def attention_view(
    model: Llama4,
    tokens: Tensor,
    layer: int,
    head: int,
    positions: str = "irope",
    chunk_size: int | None = None,
    temperature_tuning: bool | None = None,
    scale: str = "linear",
) -> go.Figure:
    """One head's attention map for ``tokens`` [1, T], with the model's weightless settings changed.

    The same weights run under ``positions`` ("irope": Llama 4's chunked RoPE layers and global NoPE
    layers; "rope": Llama 3's RoPE with global attention everywhere), ``chunk_size`` (the RoPE layers'
    attention chunk; None keeps the model's) and ``temperature_tuning`` (the NoPE layers' query scaling
    by position; None keeps the model's). The model's own settings are restored afterwards.

    The map is ``viz.attention_map_figure`` of ``attentions[layer][0, head]``: row = query, column =
    key. Under iRoPE a chunked layer draws a staircase of triangles, one per chunk: a query never sees
    the previous chunk, however close. A NoPE layer is one causal triangle. ``scale`` ("linear" or
    "log") is the colour scale of ``viz.attention_map_figure``.
    """
    _check_tokens(tokens)
    config = model.config
    if not 0 <= layer < config.num_layers:
        raise ValueError(f"layer {layer} is out of range: the model has layers 0 to {config.num_layers - 1}")
    if not 0 <= head < config.num_heads:
        raise ValueError(f"head {head} is out of range: each layer has heads 0 to {config.num_heads - 1}")
    changes: dict[str, Any] = {"positions": positions}
    if chunk_size is not None:
        changes["attention_chunk_size"] = chunk_size
    if temperature_tuning is not None:
        changes["temperature_tuning"] = temperature_tuning
    with reconfigured(model, **changes):
        attentions = model(tokens, return_attention=True).attentions
        spec = model.config.layer_plan()[layer]
    assert attentions is not None
    title = f"Layer {layer} ({viz.layer_label(spec)}), head {head}, positions={positions}"
    return viz.attention_map_figure(attentions[layer][0, head], spec, title=title, scale=scale)


def chunk_size_choices(length: int, *extra: int) -> list[int]:
    """Powers of two from 2 up to ``length`` (a chunk that covers the text is global), plus ``extra``."""
    powers = [2**k for k in range(1, int(math.log2(length)) + 1)] if length >= 2 else []
    return sorted(set(powers) | set(extra))


def attention_explorer(models: Llama4 | Mapping[str, Llama4], tokens: Tensor) -> Explorer:
    """Controls for model, layer, head, positions, chunk size and temperature; one attention map.

    ``models``: one model, or several by name (e.g. ``{"MoE": moe, "dense": dense}``: a toggle picks
    one). Positions toggle between iRoPE and RoPE; the chunk size and temperature tuning matter only
    under iRoPE and are greyed out under RoPE. The controls start at the first model's own settings,
    and every change runs :func:`attention_view` again.
    """
    length = _check_tokens(tokens)
    named = dict(models) if isinstance(models, Mapping) else {"model": models}
    if not named:
        raise ValueError("attention_explorer needs at least one model")
    first = next(iter(named.values())).config
    style = {"description_width": "initial"}

    def layer_options(config: Any) -> list[tuple[str, int]]:
        return [(f"layer {i}", i) for i in range(config.num_layers)]

    controls: dict[str, widgets.Widget] = {}
    if len(named) > 1:
        controls["model"] = widgets.ToggleButtons(options=list(named), value=next(iter(named)))
    controls["layer"] = widgets.Dropdown(options=layer_options(first), value=0, description="layer")
    controls["head"] = widgets.IntSlider(value=0, min=0, max=first.num_heads - 1, description="head")
    controls["positions"] = widgets.ToggleButtons(
        options=[("iRoPE", "irope"), ("RoPE", "rope")], value=first.positions, description="positions"
    )
    trained_chunks = {m.config.attention_chunk_size for m in named.values()}
    controls["chunk_size"] = widgets.Dropdown(
        options=chunk_size_choices(length, *trained_chunks),
        value=first.attention_chunk_size,
        description="chunk size",
        style=style,
    )
    controls["temperature_tuning"] = widgets.Checkbox(
        value=first.temperature_tuning, description="temperature tuning", style=style
    )

    def current() -> tuple[str, Llama4]:
        name = controls["model"].value if "model" in controls else next(iter(named))
        return name, named[name]

    def on_change(name: str) -> None:
        _, model = current()
        if name == "model":  # another model may have other layers and heads
            keep = min(controls["layer"].value, model.config.num_layers - 1)
            controls["layer"].options = layer_options(model.config)
            controls["layer"].value = keep
            controls["head"].max = model.config.num_heads - 1
        irope = controls["positions"].value == "irope"
        controls["chunk_size"].disabled = controls["temperature_tuning"].disabled = not irope

    def render() -> dict[str, go.Figure]:
        name, model = current()
        fig = attention_view(
            model,
            tokens,
            controls["layer"].value,
            controls["head"].value,
            positions=controls["positions"].value,
            chunk_size=controls["chunk_size"].value,
            temperature_tuning=controls["temperature_tuning"].value,
        )
        if len(named) > 1:
            fig.update_layout(title_text=f"{name} · {fig.layout.title.text}")
        return {"attention": fig}

    on_change("positions")
    return Explorer(controls, render, on_change)
