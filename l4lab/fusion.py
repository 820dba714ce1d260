"""Early fusion, measured: a tiny multimodal Llama 4 trained on ``l4lab.multimodal_data`` from scratch.

Three variants read the same prompts (``VARIANTS``):

* ``"text-only"``: the text model alone; the ``<|patch|>`` placeholders keep their own learned
  embedding and no image feature replaces them, so it cannot see (the control: chance per type);
* ``"late adapter"``: that trained text model, FROZEN; only the vision side (encoder, adapter,
  projector) is trained afterwards on the pictures, as vision used to be added to a finished text
  model (Llama 3.2 Vision froze its text model too);
* ``"early fusion"``: everything trained jointly from the start, as Llama 4 was pre-trained.

The loss is the cross-entropy of the one answer token; the rest of a prompt (random pictures, the
question) is not worth predicting. :func:`accuracy_per_type`, :func:`routing_by_modality` and
:func:`grounding_shares` measure a trained model. ``benchmarks/multimodal_fusion.py`` runs the variants
over seeds; notebook 07 runs one small early-fusion model live.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from l4lab import multimodal_data as data
from l4lab.config import Config, VisionConfig
from l4lab.model import Llama4Output
from l4lab.routing import update_selection_bias
from l4lab.vision import Llama4Multimodal

VARIANTS = ("text-only", "late adapter", "early fusion")


@dataclass(frozen=True)
class FusionSetup:
    """Every choice of the experiment, with its reason."""

    image_size: int = 32  # 2 x 2 cells of 16 pixels: room for a shape 13 pixels wide and a frame
    # 4 x 4 patches; the pixel shuffle merges each cell's 2 x 2 patches into ONE token, so a picture is 4
    # tokens (patch 4 gave 16 tokens a picture and learned the same types more slowly)
    patch_size: int = 8
    vision_width: int = 32  # four colours and three shapes need few features
    vision_layers: int = 1  # one bidirectional layer already mixes the patches of a picture
    vision_heads: int = 2  # head_dim 16: the 2D RoPE needs head_dim divisible by 4
    adapter_size: int = 64
    text_width: int = 64
    text_layers: int = 2  # one layer to gather from the asked-about tokens, one to answer
    text_heads: int = 4
    experts: int = 4  # every layer MoE (as Scout), top-1 beside the shared expert
    # trial runs (seed 0, early fusion): 600 steps already give colour, count and region 100%; 1,500
    # raise position from 47% (at 600) to 72% but leave shape at chance; 800 keeps 3 variants x 3 seeds
    # near 8 CPU-minutes
    steps: int = 800
    batch_size: int = 32
    lr: float = 3e-3  # AdamW, warm-up then cosine to a tenth; the same for every part of the model
    warmup_steps: int = 30
    bias_rate: float = 1e-3  # auxiliary-loss-free balancing, l4lab's Trainer default: no expert starves

    def config(self) -> Config:
        """The multimodal Llama 4 of this setup, with the task's vocabulary and placeholder ids."""
        vision = VisionConfig(
            image_size=self.image_size,
            patch_size=self.patch_size,
            hidden_size=self.vision_width,
            num_layers=self.vision_layers,
            num_heads=self.vision_heads,
            intermediate_size=4 * self.vision_width,  # the width of a pixel-shuffled token
            adapter_size=self.adapter_size,
            image_token_id=data.PATCH,
            image_start_token_id=data.IMAGE_START,
            image_end_token_id=data.IMAGE_END,
        )
        return Config(
            vocab_size=len(data.VOCAB),
            hidden_size=self.text_width,
            num_layers=self.text_layers,
            num_heads=self.text_heads,
            num_kv_heads=2,
            head_dim=self.text_width // self.text_heads,
            moe_intermediate_size=2 * self.text_width,
            dense_intermediate_size=4 * self.text_width,
            num_experts=self.experts,
            attention_chunk_size=64,  # longer than any prompt: attention is global
            max_position_embeddings=64,
            vision=vision,
        )

    @property
    def tokens_per_image(self) -> int:
        return self.config().vision.tokens_per_tile

    def encode(self, examples: list[data.Example]) -> data.MultimodalBatch:
        return data.encode(examples, self.tokens_per_image, self.image_size)

    def learning_rate(self, step: int, steps: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, steps - self.warmup_steps)
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def run_variant(
    model: Llama4Multimodal, batch: data.MultimodalBatch, variant: str, **kw: Any
) -> Llama4Output:
    """The model's output on the batch; the ``"text-only"`` variant never sees the pictures."""
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r} is unknown: pass one of {VARIANTS}")
    if variant == "text-only":
        return model.language_model(batch.input_ids, **kw)
    return model(batch.input_ids, pixel_values=batch.pixel_values, **kw)


def trained_parameters(model: Llama4Multimodal, variant: str) -> list[Tensor]:
    """What a variant trains: the text model (text-only), the vision side (late adapter; the text model
    is frozen), or everything (early fusion)."""
    if variant == "text-only":
        return list(model.language_model.parameters())
    if variant == "late adapter":
        model.language_model.requires_grad_(False)
        return [*model.vision_model.parameters(), *model.multi_modal_projector.parameters()]
    if variant == "early fusion":
        return list(model.parameters())
    raise ValueError(f"variant {variant!r} is unknown: pass one of {VARIANTS}")


def train_answers(
    model: Llama4Multimodal, variant: str, setup: FusionSetup, seed: int, steps: int | None = None
) -> list[float]:
    """Train ``model`` in place as ``variant`` on fresh questions (generator seed ``1000 + seed``);
    returns the loss every 50 steps. AdamW, cross-entropy on the answer token only."""
    steps = setup.steps if steps is None else steps
    trained = trained_parameters(model, variant)
    optimizer = torch.optim.AdamW(trained, lr=setup.lr, betas=(0.9, 0.95), weight_decay=0.1)
    examples = data.make_examples(steps * setup.batch_size, seed=1000 + seed)
    losses = []
    model.train()
    for step in range(steps):
        batch = setup.encode(examples[step * setup.batch_size : (step + 1) * setup.batch_size])
        out = run_variant(model, batch, variant)
        loss = F.cross_entropy(out.logits[torch.arange(len(batch.kinds)), batch.answer_at], batch.answers)
        for group in optimizer.param_groups:
            group["lr"] = setup.learning_rate(step, steps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        if variant != "late adapter":  # a frozen text model keeps its routers as they are
            for record in out.routing:
                router = model.language_model.layers[record.layer].feed_forward.router
                update_selection_bias(router.selection_bias, record, setup.bias_rate)
        if step % 50 == 0 or step == steps - 1:
            losses.append(round(float(loss.detach()), 4))
    model.eval()
    return losses


@torch.no_grad()
def accuracy_per_type(model: Llama4Multimodal, variant: str, batch: data.MultimodalBatch) -> dict[str, float]:
    """Share of right answers (the most likely token) per question type present in the batch."""
    logits = run_variant(model, batch, variant).logits[torch.arange(len(batch.kinds)), batch.answer_at]
    right = (logits.argmax(-1) == batch.answers).tolist()
    return {
        kind: statistics.fmean(r for r, k in zip(right, batch.kinds, strict=True) if k == kind)
        for kind in data.QUESTION_TYPES
        if kind in batch.kinds
    }


@torch.no_grad()
def routing_by_modality(model: Llama4Multimodal, batch: data.MultimodalBatch) -> list[float]:
    """Per MoE layer, the total-variation distance between the expert shares of image tokens and of text
    tokens (top-1 choices): 0 when both use the experts in the same proportions, 1 when no expert serves
    both. Text tokens: every token that is neither a placeholder nor padding."""
    out = model(batch.input_ids, pixel_values=batch.pixel_values)
    image = batch.input_ids == data.PATCH
    text = ~image & (batch.input_ids != data.PAD)
    distances = []
    for record in out.routing:
        chosen = record.experts[..., 0]
        shares = [
            torch.bincount(chosen[mask], minlength=model.config.num_experts).double() / int(mask.sum())
            for mask in (image, text)
        ]
        distances.append(0.5 * float((shares[0] - shares[1]).abs().sum()))
    return distances


@torch.no_grad()
def grounding_shares(
    model: Llama4Multimodal, batch: data.MultimodalBatch, examples: list[data.Example]
) -> dict[str, float]:
    """Mean share of the answer position's attention to image tokens that falls on the asked-about part
    (attention averaged over heads and layers, ``l4lab.viz.image_attention``).

    ``"region"``: the framed cell's tokens (a quarter of the picture's tokens, so 0.25 for attention that
    ignores the frame); ``"two-images"``: the asked-about picture's tokens (half of them, 0.5).
    """
    from l4lab.viz.multimodal import image_attention

    out = model(batch.input_ids, pixel_values=batch.pixel_values, return_attention=True)
    side = math.isqrt(model.config.vision.tokens_per_tile)
    half = side // 2
    shares: dict[str, list[float]] = {"region": [], "two-images": []}
    for row, example in enumerate(examples):
        if example.kind not in shares:
            continue
        query = int(batch.answer_at[row])
        grids = image_attention(out.attentions, batch.input_ids, row, query, data.PATCH, side)
        if example.kind == "region":
            top, left = divmod(example.scenes[0].framed, 2)
            share = grids[0, top * half : (top + 1) * half, left * half : (left + 1) * half].sum()
        else:
            share = grids[data.ORDINALS.index(example.question[-1])].sum()
        shares[example.kind].append(float(share))
    return {kind: statistics.fmean(values) for kind, values in shares.items() if values}
