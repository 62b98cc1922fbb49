"""colafx: CoLA low-rank pre-training and QuZO quantized zeroth-order fine-tuning for PyTorch."""
__version__ = "0.1.0"
