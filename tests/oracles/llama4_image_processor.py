"""Record transformers' Llama4ImageProcessor on l4lab's deterministic test pictures, for tests/test_images.py.

The processor needs torchvision, which does not import beside the CPU build of torch that l4lab's test
environment uses; run this once in a separate environment that has both, e.g.
``python -m venv oracle && oracle/bin/pip install torch==2.14.1 torchvision==0.29.1 transformers==5.24.0``
then ``oracle/bin/python tests/oracles/llama4_image_processor.py``. It writes llama4_image_processor.json
beside itself: per picture, the aspect ratios, the shape and a sha256 of the pixel values (as float32).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import platform
import sys
from pathlib import Path

import torch
import torchvision
import transformers
from transformers.models.llama4.image_processing_llama4 import Llama4ImageProcessor

HERE = Path(__file__).parent
# l4lab.images alone (the package's __init__ imports plotting libraries this environment need not have)
spec = importlib.util.spec_from_file_location("images", HERE.parent.parent / "l4lab" / "images.py")
images = importlib.util.module_from_spec(spec)
sys.modules["images"] = images  # dataclasses look their module up
spec.loader.exec_module(images)

# (height, width, seed): square, exact multiples, tiny, extreme aspect ratios, large, odd sizes
SIZES = [
    (336, 336, 0),
    (672, 336, 1),
    (100, 50, 2),
    (1, 1, 3),
    (5, 7, 4),
    (3, 900, 5),
    (1200, 2, 6),
    (400, 2000, 7),
    (337, 335, 8),
    (1500, 1100, 9),
    (50, 1000, 10),
    (700, 333, 11),
]


def main() -> None:
    processor = Llama4ImageProcessor()
    cases = []
    for height, width, seed in SIZES:
        picture = images.pattern_image(height, width, seed=seed)
        out = processor(picture, return_tensors="pt", input_data_format="channels_last")
        values = out["pixel_values"].float()
        cases.append(
            {
                "height": height,
                "width": width,
                "seed": seed,
                "aspect_ratios": out["aspect_ratios"].tolist(),
                "shape": list(values.shape),
                "sha256": hashlib.sha256(values.numpy().tobytes()).hexdigest(),
            }
        )
    record = {
        "source": "transformers.models.llama4.image_processing_llama4.Llama4ImageProcessor()",
        "versions": {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.machine(),
        },
        "cases": cases,
    }
    (HERE / "llama4_image_processor.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
