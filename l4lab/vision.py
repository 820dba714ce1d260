"""Llama 4's vision encoder and early fusion, top to bottom, the way the architecture reads.

    tiles [N, 3, 336, 336] -> patches (Unfold + linear) -> [N, 576, 1408]
        -> append the class embedding, add learned positions, LayerNorm   [N, 577, 1408]
        -> 34 x VisionEncoderLayer (2D RoPE, bidirectional attention, GELU MLP)
        -> LayerNorm, drop the class token                               [N, 576, 1408]
        -> pixel shuffle: 2 x 2 neighbouring patches -> one token        [N, 144, 5632]
        -> adapter MLP (GELU, GELU)                                       [N, 144, 4096]
        -> projector into the text model's width                         [N, 144, 5120]
        -> these features REPLACE the embeddings of the <|patch|> placeholder tokens, in order,
           and the text model reads image and text tokens together from its first layer on.

That last step is "early fusion": Llama 4 was pre-trained on text and images together, and image tokens
are ordinary tokens of its sequence. Llama 3.2 Vision instead added cross-attention layers to a text
model trained before. The text model here is :class:`l4lab.model.Llama4` unchanged, with its toggles and
its eager/fused backends; the vision side is plain PyTorch.

Parameter names are the ones of published multimodal checkpoints (transformers'
``Llama4ForConditionalGeneration``; the text model's keep l4lab's names under ``language_model.``).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from l4lab.cache import KVCache
from l4lab.config import Config, VisionConfig
from l4lab.model import Llama4, Llama4Output, check_input_ids
from l4lab.ops import apply_rope

# Llama 4's vision LayerNorms use PyTorch's default epsilon (transformers ignores its config's norm_eps)
LAYER_NORM_EPS = 1e-5


# ---------------------------------------------------------------------- patches
class PatchEmbedding(nn.Module):
    """Cut each tile into ``patch_size`` x ``patch_size`` squares and map each to a vector.

    ``Unfold`` lays every patch out as a row of ``3 * 14 * 14 = 588`` numbers (channel, then row, then
    column), patches in reading order (row by row); a bias-free linear map takes each to the width.
    This is a strided convolution written as a matrix product.
    """

    def __init__(self, vision: VisionConfig) -> None:
        super().__init__()
        self.patch_size = vision.patch_size
        self.linear = nn.Linear(vision.num_channels * vision.patch_size**2, vision.hidden_size, bias=False)

    def forward(self, pixel_values: Tensor) -> Tensor:
        patches = F.unfold(pixel_values, kernel_size=self.patch_size, stride=self.patch_size)  # [N, 588, 576]
        return self.linear(patches.transpose(1, 2))  # [N, 576, width]


def vision_rope_angles(vision: VisionConfig) -> Tensor:
    """Complex rotations [patches + 1, head_dim / 2] of Llama 4's 2D RoPE; the class token's are 1.

    A patch in column x and row y (counted from 1) turns its first head_dim / 4 feature pairs by
    ``x * f_i`` and the next head_dim / 4 by ``y * f_i``, with ``f_i = theta^(-4i / head_dim)``:
    attention then sees horizontal and vertical offsets separately. The class token, appended last,
    has no place in the grid and is not rotated (frequency zero). (Pixtral splits the pairs the other
    way, alternating x and y; Llama 4's weights need this order.)
    """
    side, quarter = vision.patches_per_side, vision.head_dim // 4
    frequencies = 1.0 / (
        vision.rope_theta ** (torch.arange(quarter, dtype=torch.float) * 4 / vision.head_dim)
    )
    patch = torch.arange(side * side)
    column, row = patch % side + 1, patch // side + 1
    angles = torch.cat([column[:, None] * frequencies, row[:, None] * frequencies], dim=1)  # [576, hd/2]
    angles = torch.cat([angles, torch.zeros(1, 2 * quarter)])  # the class token
    return torch.polar(torch.ones_like(angles), angles)


# ---------------------------------------------------------------------- the encoder
class VisionAttention(nn.Module):
    """Multi-head self-attention over the patches of one tile: with biases, 2D RoPE, and NO mask.

    Every patch sees every other patch (an image has no reading order), unlike the causal text model.
    """

    def __init__(self, vision: VisionConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = vision.num_heads, vision.head_dim
        d = vision.hidden_size
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.o_proj = nn.Linear(d, d)

    def forward(self, x: Tensor, freqs_cis: Tensor, need_probs: bool = False) -> tuple[Tensor, Tensor | None]:
        tiles, length, _ = x.shape
        shape = (tiles, length, self.num_heads, self.head_dim)
        q = apply_rope(self.q_proj(x).view(shape), freqs_cis).transpose(1, 2)  # [N, heads, T, head_dim]
        k = apply_rope(self.k_proj(x).view(shape), freqs_cis).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.head_dim), dim=-1)
        out = (probs @ v).transpose(1, 2).reshape(tiles, length, -1)
        return self.o_proj(out), probs if need_probs else None


class VisionMLP(nn.Module):
    """``fc2(gelu(fc1(x)))`` with biases: the feed-forward of a ViT (exact, erf-based GELU)."""

    def __init__(self, vision: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(vision.hidden_size, vision.intermediate_size)
        self.fc2 = nn.Linear(vision.intermediate_size, vision.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionEncoderLayer(nn.Module):
    """One pre-LayerNorm block: ``h = x + Attention(LN(x))``, ``out = h + MLP(LN(h))``."""

    def __init__(self, vision: VisionConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(vision.hidden_size, eps=LAYER_NORM_EPS)
        self.self_attn = VisionAttention(vision)
        self.post_attention_layernorm = nn.LayerNorm(vision.hidden_size, eps=LAYER_NORM_EPS)
        self.mlp = VisionMLP(vision)

    def forward(self, x: Tensor, freqs_cis: Tensor, need_probs: bool = False) -> tuple[Tensor, Tensor | None]:
        attended, probs = self.self_attn(self.input_layernorm(x), freqs_cis, need_probs)
        h = x + attended
        return h + self.mlp(self.post_attention_layernorm(h)), probs


class VisionEncoder(nn.Module):
    """The stack of encoder layers (published checkpoints call it ``vision_model.model``)."""

    def __init__(self, vision: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(vision) for _ in range(vision.num_layers))


# ---------------------------------------------------------------------- patches -> tokens
def pixel_shuffle(patches: Tensor, factor: int = 2) -> Tensor:
    """Merge ``factor`` x ``factor`` neighbouring patches into one token with factor^2 times the channels.

    patches [N, side * side, C] in reading order -> tokens [N, (side / factor)^2, factor^2 * C], also in
    reading order. Token (i, j) holds the patches (factor*i + di, factor*j + dj) for di, dj < factor,
    concatenated as [di, dj, C]: the one above-left first, then the one to its right, then the row
    below. Llama 4 merges 2 x 2: a tile's 576 patches become 144 tokens, four times fewer tokens for the
    text model to attend over, without throwing a feature away.
    """
    tiles, count, channels = patches.shape
    side = math.isqrt(count)
    grid = patches.view(
        tiles, side // factor, factor, side // factor, factor, channels
    )  # [N, i, di, j, dj, C]
    grid = grid.permute(0, 1, 3, 2, 4, 5)  # [N, i, j, di, dj, C]
    return grid.reshape(tiles, (side // factor) ** 2, factor * factor * channels)


class AdapterMLP(nn.Module):
    """Two bias-free layers with a GELU after EACH (the second GELU too): shuffled patches -> features."""

    def __init__(self, vision: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(vision.intermediate_size, vision.adapter_size, bias=False)
        self.fc2 = nn.Linear(vision.adapter_size, vision.adapter_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.fc2(F.gelu(self.fc1(x))))


class VisionAdapter(nn.Module):
    """Pixel shuffle, then the adapter MLP (published checkpoints: ``vision_model.vision_adapter``)."""

    def __init__(self, vision: VisionConfig) -> None:
        super().__init__()
        self.factor = vision.shuffle_factor
        self.mlp = AdapterMLP(vision)

    def forward(self, patches: Tensor) -> Tensor:
        return self.mlp(pixel_shuffle(patches, self.factor))


class VisionModel(nn.Module):
    """Tiles [N, 3, S, S] -> features [N, tokens_per_tile, adapter_size]: Llama 4's image encoder.

    The class embedding is APPENDED after the patches (CLIP prepends it); it gathers the tile in
    attention but is dropped at the end: Llama 4 keeps only the patches.
    """

    def __init__(self, vision: VisionConfig) -> None:
        super().__init__()
        self.config = vision
        patches = vision.patches_per_side**2
        self.patch_embedding = PatchEmbedding(vision)
        self.class_embedding = nn.Parameter(torch.empty(vision.hidden_size))
        self.positional_embedding_vlm = nn.Parameter(torch.empty(patches + 1, vision.hidden_size))
        self.layernorm_pre = nn.LayerNorm(vision.hidden_size, eps=LAYER_NORM_EPS)
        self.model = VisionEncoder(vision)
        self.layernorm_post = nn.LayerNorm(vision.hidden_size, eps=LAYER_NORM_EPS)
        self.vision_adapter = VisionAdapter(vision)

    def encode(
        self, pixel_values: Tensor, return_attention: bool = False
    ) -> tuple[Tensor, list[Tensor] | None]:
        """The encoder's output per patch [N, patches, width] (class token dropped), and per layer the
        attention [N, heads, patches + 1, patches + 1] when asked for."""
        x = self.patch_embedding(pixel_values)  # [N, 576, width]
        x = torch.cat([x, self.class_embedding.expand(x.shape[0], 1, -1)], dim=1)  # class token LAST
        x = self.layernorm_pre(x + self.positional_embedding_vlm)
        freqs_cis = vision_rope_angles(self.config).to(x.device)
        attentions: list[Tensor] | None = [] if return_attention else None
        for layer in self.model.layers:
            x, probs = layer(x, freqs_cis, return_attention)
            if attentions is not None:
                attentions.append(probs)
        return self.layernorm_post(x)[:, :-1], attentions

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.vision_adapter(self.encode(pixel_values)[0])


class MultiModalProjector(nn.Module):
    """A bias-free linear map from the adapter's width into the text model's embedding width."""

    def __init__(self, vision: VisionConfig, text_hidden_size: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(vision.adapter_size, text_hidden_size, bias=False)

    def forward(self, features: Tensor) -> Tensor:
        return self.linear_1(features)


# ---------------------------------------------------------------------- early fusion
def merge_image_features(
    embeddings: Tensor, input_ids: Tensor, features: Tensor, image_token_id: int
) -> Tensor:
    """Replace the embeddings of the ``image_token_id`` placeholders by ``features``, in order.

    embeddings [B, T, D]; features [tokens, D], the images' tokens one after the other, matching the
    placeholders in reading order (row 0 of the batch first, left to right). Rows without placeholders
    (text only) are left as they are.
    """
    placeholders = input_ids == image_token_id
    count = int(placeholders.sum())
    if count != features.shape[0]:
        raise ValueError(
            f"input_ids hold {count} image placeholder tokens (<|patch|>, id {image_token_id}) but the "
            f"images give {features.shape[0]} features: put one placeholder per image token in the prompt "
            "(tokens_per_tile for each tile), or pass the images that the prompt was built for"
        )
    return embeddings.masked_scatter(placeholders[..., None], features.to(embeddings.dtype))


class Llama4Multimodal(nn.Module):
    """Llama 4 with its vision encoder: images enter the text model's sequence as tokens (early fusion).

    ``model(input_ids, pixel_values=tiles).logits`` equals transformers' ``Llama4ForConditionalGeneration``
    on the same weights. ``pixel_values`` [tiles, 3, S, S] holds every tile of every image of the batch,
    in the order their placeholders appear in ``input_ids`` (see ``l4lab.ImageProcessor``).
    """

    def __init__(self, config: Config) -> None:
        super().__init__()
        if config.vision is None:
            raise ValueError(
                "a multimodal model needs config.vision (a VisionConfig); e.g. "
                "preset('llama4-scout') has one, or pass Config(..., vision=VisionConfig(...))"
            )
        self.config = config
        self.vision_model = VisionModel(config.vision)
        self.multi_modal_projector = MultiModalProjector(config.vision, config.hidden_size)
        self.language_model = Llama4(config)
        self.reset_vision_parameters()

    @torch.no_grad()
    def reset_vision_parameters(self, std: float = 0.02) -> None:
        """Normal(0, std) weights, zero biases, LayerNorms at one (a no-op on the meta device)."""
        for module in self.vision_model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
            elif isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std)
                if module.bias is not None:
                    module.bias.zero_()
        self.vision_model.class_embedding.normal_(0.0, std)
        self.vision_model.positional_embedding_vlm.normal_(0.0, std)
        self.multi_modal_projector.linear_1.weight.normal_(0.0, std)

    # ------------------------------------------------------------------ the text model's toggles
    def set_backend(self, backend: str) -> None:
        """``"eager"`` or ``"fused"`` kernels for the text model (the vision encoder is plain PyTorch)."""
        self.reconfigure(backend=backend)

    def set_positions(self, positions: str) -> None:
        self.reconfigure(positions=positions)

    def reconfigure(self, **changes: Any) -> None:
        """Change the text model's weightless fields (see :meth:`l4lab.Llama4.reconfigure`)."""
        self.language_model.reconfigure(**changes)
        self.config = self.language_model.config

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write a checkpoint directory that transformers' ``Llama4ForConditionalGeneration`` loads."""
        from l4lab.interop import save_pretrained

        save_pretrained(self, path)

    def new_cache(self) -> KVCache:
        return self.language_model.new_cache()

    @property
    def device(self) -> torch.device:
        return self.language_model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.dtype

    # ------------------------------------------------------------------ forward
    def image_features(self, pixel_values: Tensor) -> Tensor:
        """Tiles [N, 3, S, S] -> text-width features [N, tokens_per_tile, hidden_size]."""
        check_pixel_values(pixel_values, self.config.vision, self.device)
        return self.multi_modal_projector(self.vision_model(pixel_values.to(self.dtype)))

    def embed(self, input_ids: Tensor, pixel_values: Tensor | None = None) -> Tensor:
        """Token embeddings [B, T, D] with the image features in place of the placeholders."""
        embeddings = self.language_model.embed_tokens(input_ids)
        features = torch.zeros(0, embeddings.shape[-1], dtype=embeddings.dtype, device=embeddings.device)
        if pixel_values is not None:
            features = self.image_features(pixel_values).flatten(0, 1)
        return merge_image_features(embeddings, input_ids, features, self.config.vision.image_token_id)

    def forward(
        self,
        input_ids: Tensor,
        pixel_values: Tensor | None = None,
        cache: KVCache | None = None,
        return_attention: bool = False,
    ) -> Llama4Output:
        """Logits for ``input_ids`` [B, T] whose placeholders are filled with the images' features."""
        position = cache.position if cache is not None else 0
        check_input_ids(input_ids, self.config, position, self.device)
        embeddings = self.embed(input_ids, pixel_values)
        return self.language_model(input_ids, cache, return_attention, inputs_embeds=embeddings)

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        pixel_values: Tensor | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        eos_token_id: int | None = None,
    ) -> Tensor:
        """The prompt [B, T] and ``max_new_tokens`` new tokens, decoded with a KV cache.

        The images are encoded ONCE, into the prompt's embeddings; the new tokens are text and attend to
        the images through the cache. Arguments as in :meth:`l4lab.Llama4.generate`.
        """
        check_input_ids(input_ids, self.config, 0, self.device)
        embeddings = self.embed(input_ids, pixel_values)
        return self.language_model.generate(
            input_ids, max_new_tokens, temperature, top_p, seed, eos_token_id, inputs_embeds=embeddings
        )


# ---------------------------------------------------------------------- input checks
def check_pixel_values(pixel_values: Any, vision: VisionConfig, device: torch.device) -> None:
    """Raise an error that says what is wrong with ``pixel_values`` and what to pass instead."""
    size, channels = vision.image_size, vision.num_channels
    wanted = f"[tiles, {channels}, {size}, {size}]"
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(
            f"pixel_values must be a float tensor of tiles {wanted}; got {type(pixel_values).__name__}. "
            "l4lab.ImageProcessor()(images) makes them from PIL images or uint8 arrays"
        )
    if not pixel_values.dtype.is_floating_point:
        raise TypeError(
            f"pixel_values has dtype {pixel_values.dtype}; it must be a floating-point tensor of normalised "
            "pixels (uint8 images go through l4lab.ImageProcessor first)"
        )
    if pixel_values.dim() != 4:
        hint = " (one tile: use pixel_values[None])" if pixel_values.dim() == 3 else ""
        raise ValueError(f"pixel_values must have shape {wanted}; got {tuple(pixel_values.shape)}{hint}")
    if pixel_values.shape[1] != channels:
        last = (
            " (channels last? use pixel_values.permute(0, 3, 1, 2))"
            if pixel_values.shape[-1] == channels
            else ""
        )
        raise ValueError(
            f"pixel_values has {pixel_values.shape[1]} channels in dimension 1; the encoder reads {channels} "
            f"(shape {wanted}){last}"
        )
    if tuple(pixel_values.shape[2:]) != (size, size):
        raise ValueError(
            f"pixel_values has tiles of {pixel_values.shape[2]} x {pixel_values.shape[3]} pixels; the "
            f"encoder reads tiles of {size} x {size} (its learned positions are for that grid): "
            "resize and split images with l4lab.ImageProcessor"
        )
    if pixel_values.device != device:
        raise ValueError(
            f"pixel_values is on {pixel_values.device} but the model is on {device}; "
            f"move them with pixel_values.to({str(device)!r})"
        )
