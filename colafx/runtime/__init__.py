"""Runtime: executes rewritten models (pre-training, zeroth-order fine-tuning, ONNX inference)."""
from __future__ import annotations

import importlib

_LAZY = {
    "QuZO": "colafx.runtime.zo",
    "OnnxCausalLM": "colafx.runtime.export",
    "load_model": "colafx.runtime.models",
    "load_tokenizer": "colafx.runtime.models",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'colafx.runtime' has no attribute {name!r}")
