"""Training checkpoints: model, optimizer, scheduler, data position and RNG states, atomically.

A checkpoint is a folder ``<root>/step-<N>/`` holding the model as a colafx checkpoint
(``model.safetensors`` + ``colafx.json``, see :mod:`colafx.transform.io`), ``trainer.pt`` (optimizer,
scheduler, RNG states) and ``trainer.json`` (step, data position, the run's fingerprint and the
SHA-256 of ``trainer.pt``). The folder is written under a temporary name and renamed, so a crash
never leaves a half-written ``step-<N>``; only the last ``keep`` checkpoints are kept.
"""
from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from colafx import files
from colafx.transform import io
from colafx.transform.io import CheckpointError

PREFIX = "step-"
STATE_NAME = "trainer.pt"
MANIFEST_NAME = "trainer.json"


def rng_state() -> dict:
    """The RNG states of Python, torch (CPU) and, when present, CUDA."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore states returned by :func:`rng_state`."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoints(root: str | os.PathLike) -> list[Path]:
    """Completed checkpoint folders under ``root``, oldest step first (empty if none)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest(root: str | os.PathLike) -> Path | None:
    """The newest checkpoint folder under ``root``, or None."""
    found = checkpoints(root)
    return found[-1] if found else None


def save_checkpoint(root: str | os.PathLike, step: int, model: nn.Module, optimizer_state: dict,
                    scheduler_state: dict, fingerprint: dict, extra: dict | None = None,
                    keep: int = 2) -> Path:
    """Write checkpoint ``<root>/step-<step>`` atomically and delete all but the newest ``keep``.

    ``model`` is an unwrapped module (not DDP/FSDP); ``fingerprint`` (JSON-able) describes the run,
    and a resume with a different fingerprint is refused; ``extra`` (JSON-able) is returned on load.

    Raises:
        ValueError: ``keep < 1``.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=root))
    try:
        io.save(model, tmp)
        torch.save({"optimizer": optimizer_state, "scheduler": scheduler_state, "rng": rng_state()},
                   tmp / STATE_NAME)
        files.atomic_write_json(tmp / MANIFEST_NAME, {
            "step": step, "fingerprint": fingerprint, "extra": extra or {},
            "state_sha256": files.file_sha256(tmp / STATE_NAME)})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | os.PathLike, model: nn.Module, fingerprint: dict | None = None,
                    may_differ: tuple[str, ...] = ()) -> dict:
    """Check checkpoint ``path`` and load its weights into ``model`` (unwrapped, same structure).

    ``may_differ``: fingerprint keys allowed to differ (e.g. ``steps`` when a run is extended).

    Returns:
        ``{"step", "extra", "fingerprint", "optimizer", "scheduler", "rng"}``; the caller restores the
        optimizer, scheduler and RNG (:func:`set_rng_state`) from them.

    Raises:
        FileNotFoundError: ``path`` or one of its files is missing.
        CheckpointError: a file is corrupt (bad JSON, SHA-256 mismatch, unreadable tensors), the
            fingerprint differs from ``fingerprint`` (the differing keys are named), or the weights do
            not fit ``model`` (dense vs CoLA, other rank or shape).
    """
    import json

    from safetensors import SafetensorError
    from safetensors.torch import load_model

    path = Path(path)
    record = io.read_record(path)
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file() or not (path / STATE_NAME).is_file():
        raise FileNotFoundError(f"checkpoint {path} is incomplete: {MANIFEST_NAME} or {STATE_NAME} is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
        step = int(manifest["step"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{manifest_path} is corrupt: {err}") from None
    saved = manifest.get("fingerprint") or {}
    diff = [] if fingerprint is None else sorted(
        k for k in set(saved) | set(fingerprint)
        if saved.get(k) != json_roundtrip(fingerprint).get(k) and k not in may_differ)
    if diff:
        detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs run {fingerprint.get(k)!r}" for k in diff)
        raise CheckpointError(f"checkpoint {path} belongs to a different run ({detail}); "
                              "use a new --out folder or the same settings")
    if files.file_sha256(path / STATE_NAME) != manifest.get("state_sha256"):
        raise CheckpointError(f"{path / STATE_NAME} is corrupt: its SHA-256 does not match {MANIFEST_NAME}")
    weights = path / io.WEIGHTS_NAME
    if files.file_sha256(weights) != record.get("weights_sha256"):
        raise CheckpointError(f"{weights} is corrupt: its SHA-256 does not match {io.CONFIG_NAME}")
    mine = io.model_record(model)["transforms"]
    if record.get("transforms", {}) != json_roundtrip(mine):
        raise CheckpointError(f"checkpoint {path} holds a different model structure (transformations "
                              f"{sorted(record.get('transforms', {}))} vs {sorted(mine)}, or other CoLA ranks)")
    try:
        load_model(model, str(weights), strict=True)
    except SafetensorError as err:
        raise CheckpointError(f"{weights} is corrupt: {err}") from None
    except RuntimeError as err:
        raise CheckpointError(f"{weights} does not fit the model: {err}") from None
    try:
        state = torch.load(path / STATE_NAME, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise CheckpointError(f"{path / STATE_NAME} is corrupt: {err}") from None
    return {"step": step, "extra": manifest.get("extra", {}), "fingerprint": saved, **state}


def json_roundtrip(obj):
    """``obj`` as it reads back from JSON (tuples become lists, keys strings)."""
    import json

    return json.loads(json.dumps(obj, default=str))
