"""``save`` / ``load``: safetensors weights plus a JSON record of colafx's transformations.

A checkpoint directory holds ``model.safetensors`` and ``colafx.json`` (the Hugging Face config, the
CoLA sites, and any other recorded transformation such as quantization, plus the SHA-256 of the
weights). Both files are written to a temporary name and renamed, so an interrupted save never
leaves a half-written checkpoint behind.
"""
from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from colafx.files import atomic_write_bytes, atomic_write_json, file_sha256
from colafx.transform.modules import CoLALinear

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "colafx.json"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is corrupt, incomplete or does not fit the model."""


# Transformations that must be replayed on a fresh model before its weights load.
# Each entry: name -> (record(model) -> JSON-able or None, rebuild(model, record) -> None).
_RECORDERS: dict[str, tuple[Callable, Callable]] = {}
# Modules that register a transformation when imported, for records written by them.
_REGISTRARS = {"quant": "colafx.transform.quantize"}


def register_transform(name: str, record: Callable, rebuild: Callable) -> None:
    """Register how to record a model transformation in ``colafx.json`` and replay it on load.

    Transformations are replayed in registration order (CoLA first, then quantization, ...).
    """
    _RECORDERS[name] = (record, rebuild)


def _record_cola(model: nn.Module):
    sites = {name: {"in": m.in_features, "out": m.out_features, "rank": m.rank, "act": m.act,
                    "bias": m.cola_b.bias is not None, "role": m.role}
             for name, m in model.named_modules() if isinstance(m, CoLALinear)}
    return sites or None


def _rebuild_cola(model: nn.Module, sites: dict) -> None:
    from colafx.transform.colaify import _set_submodule

    for name, s in sites.items():
        old = model.get_submodule(name)
        ref = next(old.parameters(), None)
        module = CoLALinear(s["in"], s["out"], s["rank"], s["bias"], s["act"], s.get("role", ""),
                            device=ref.device if ref is not None else None,
                            dtype=ref.dtype if ref is not None else None)
        _set_submodule(model, name, module)


register_transform("cola", _record_cola, _rebuild_cola)


def model_record(model: nn.Module) -> dict:
    """The JSON record that describes how to rebuild ``model`` (architecture + transformations)."""
    config = getattr(model, "config", None)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return {
        "format": "colafx",
        "version": FORMAT_VERSION,
        "architecture": type(model).__name__,
        "hf_config": config.to_dict() if hasattr(config, "to_dict") else None,
        "dtype": str(dtype).removeprefix("torch."),
        "transforms": {name: rec for name, (record, _) in _RECORDERS.items()
                       if (rec := record(model)) is not None},
    }


def save(model: nn.Module, directory: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Save ``model`` to ``directory`` as ``model.safetensors`` + ``colafx.json`` (atomically).

    ``metadata`` (JSON-able) is stored under ``"metadata"`` in ``colafx.json``.

    Returns:
        the directory path.
    """
    from safetensors.torch import save_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / WEIGHTS_NAME
    atomic_write_bytes(weights, lambda tmp: save_model(model, tmp))
    record = model_record(model)
    record["weights_sha256"] = file_sha256(weights)
    record["metadata"] = metadata or {}
    atomic_write_json(directory / CONFIG_NAME, record)
    return directory


def read_record(directory: str | os.PathLike) -> dict:
    """Read and check ``colafx.json`` of a checkpoint directory.

    Raises:
        FileNotFoundError: the directory or one of its two files is missing.
        CheckpointError: the JSON is corrupt or not a colafx record.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"checkpoint {directory} is incomplete: {name} is missing")
    try:
        record = json.loads((directory / CONFIG_NAME).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{directory / CONFIG_NAME} is corrupt (not valid JSON): {err}") from None
    if not isinstance(record, dict) or record.get("format") != "colafx":
        raise CheckpointError(f"{directory / CONFIG_NAME} is not a colafx checkpoint record")
    if record.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint format {record['version']} is newer than this colafx "
                              f"(reads up to {FORMAT_VERSION}); upgrade colafx")
    return record


def build_from_record(record: dict) -> nn.Module:
    """Instantiate the (dense, untransformed) Hugging Face model a record describes.

    Raises:
        CheckpointError: the record holds no Hugging Face config (pass ``model=`` to ``load``).
    """
    import transformers

    hf_config = record.get("hf_config")
    arch = record.get("architecture")
    if not hf_config or not hasattr(transformers, str(arch)):
        raise CheckpointError(f"checkpoint of a {arch} model without a Hugging Face config: pass a freshly "
                              "built model as load(directory, model=...)")
    config = transformers.AutoConfig.for_model(**hf_config)
    return getattr(transformers, arch)(config)


def load(directory: str | os.PathLike, model: nn.Module | None = None, device: str | torch.device = "cpu",
         verify: bool = True) -> nn.Module:
    """Load a checkpoint written by :func:`save`, replaying its transformations.

    ``model``: a freshly built dense model of the same architecture (required for non-Hugging-Face
    models; Hugging Face models are rebuilt from the stored config, and returned in eval mode as
    ``from_pretrained`` does). ``verify`` checks the SHA-256.

    Raises:
        FileNotFoundError: missing directory or file.
        CheckpointError: corrupt files, checksum mismatch, or weights that do not fit the model.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    directory = Path(directory)
    record = read_record(directory)
    weights = directory / WEIGHTS_NAME
    if verify and record.get("weights_sha256") and file_sha256(weights) != record["weights_sha256"]:
        raise CheckpointError(f"{weights} is corrupt: its SHA-256 does not match the one recorded at save time")
    built = model is None
    if built:
        model = build_from_record(record)
    dtype = getattr(torch, record.get("dtype", "float32"), torch.float32)
    model = model.to(dtype=dtype)
    for name in record.get("transforms", {}):
        if name not in _RECORDERS and name in _REGISTRARS:
            importlib.import_module(_REGISTRARS[name])
    for name, (_, rebuild) in _RECORDERS.items():
        if name in record.get("transforms", {}):
            rebuild(model, record["transforms"][name])
    unknown = set(record.get("transforms", {})) - set(_RECORDERS)
    if unknown:
        raise CheckpointError(f"checkpoint uses transformations {sorted(unknown)} that this colafx does not "
                              "know (import the module that registers them)")
    try:
        load_model(model, str(weights), strict=True, device=str(device))
    except SafetensorError as err:
        raise CheckpointError(f"{weights} is corrupt: {err}") from None
    except RuntimeError as err:
        raise CheckpointError(f"{weights} does not fit the {type(model).__name__} model: {err}") from None
    if built:
        model.eval()  # dropout off, as after from_pretrained
    return model.to(device)
