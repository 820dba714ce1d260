"""l4lab: learn how Llama 4 works by building it, running it and looking inside it."""

from l4lab import claims, data, routing, train, viz
from l4lab.cache import KVCache
from l4lab.config import (
    Config,
    LayerSpec,
    RopeScaling,
    VisionConfig,
    count_params,
    count_vision_params,
    preset,
    preset_names,
)
from l4lab.images import ImageProcessor, ProcessedImages, image_prompt
from l4lab.interop import config_from_transformers, from_transformers, load_pretrained, to_transformers_config
from l4lab.model import Llama4, Llama4Output, RoutingRecord
from l4lab.planner import plan
from l4lab.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from l4lab.vision import Llama4Multimodal

__all__ = [
    "ByteTokenizer",
    "Config",
    "HFTokenizer",
    "ImageProcessor",
    "KVCache",
    "LayerSpec",
    "Llama4",
    "Llama4Multimodal",
    "Llama4Output",
    "ProcessedImages",
    "RopeScaling",
    "RoutingRecord",
    "VisionConfig",
    "claims",
    "config_from_transformers",
    "count_params",
    "count_vision_params",
    "data",
    "from_transformers",
    "image_prompt",
    "load_pretrained",
    "load_tokenizer",
    "plan",
    "preset",
    "preset_names",
    "routing",
    "to_transformers_config",
    "train",
    "viz",
]
__version__ = "0.1.0"
