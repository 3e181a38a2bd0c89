"""What a service needs to know about a model folder on disk (a Hugging Face-style folder: config.json,
tokenizer.json, *.safetensors)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def is_model_folder(path: Path) -> bool:
    return all((path / f).exists() for f in ("config.json", "tokenizer.json", "model.safetensors"))


def weight_bytes(path: str | os.PathLike) -> int:
    """Bytes of the model's weights on disk (what a prewarmed copy occupies in device memory)."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def max_context(path: str | os.PathLike) -> int:
    cfg = json.loads((Path(path) / "config.json").read_text())
    return int(cfg.get("max_position_embeddings", 2048))
