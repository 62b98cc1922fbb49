"""colafx: CoLA low-rank pre-training and QuZO quantized zeroth-order fine-tuning for PyTorch.

Public API (see README): ``plan``, ``colaify``, ``enable_recompute`` / ``disable_recompute``,
``quantize_`` / ``QuantConfig``, ``save`` / ``load``, ``export_onnx``, ``presets``.
"""
from __future__ import annotations

import importlib
import sys

__version__ = "0.1.0"

from colafx import presets  # noqa: E402
from colafx.transform.colaify import Plan, colaify, plan  # noqa: E402
from colafx.transform.io import load, save  # noqa: E402

# Names implemented in modules that import heavier dependencies; resolved on first use.
_LAZY = {
    "enable_recompute": "colafx.transform.recompute",
    "disable_recompute": "colafx.transform.recompute",
    "quantize_": "colafx.transform.quantize",
    "QuantConfig": "colafx.transform.quantize",
    "export_onnx": "colafx.runtime.export",
}

# The compile backend "colafx" reaches Dynamo through the package's entry point on first use. When
# Dynamo is already loaded, register it now as well (cheap then); importing torch._dynamo just for
# this would double the import time of colafx.
if "torch._dynamo" in sys.modules:
    importlib.import_module("colafx.transform.backend")

__all__ = ["presets", "plan", "Plan", "colaify", "save", "load", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'colafx' has no attribute {name!r}")
