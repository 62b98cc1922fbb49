"""Training checkpoints: model, optimizer, scheduler, data position and RNG states, atomically.

A checkpoint is a folder ``<root>/step-<N>/`` holding the model as a colafx checkpoint
(``model.safetensors`` + ``colafx.json``, see :mod:`colafx.transform.io`), ``trainer.pt`` (optimizer,
scheduler, RNG states) and ``trainer.json`` (step, data position, the run's fingerprint and the
SHA-256 of ``trainer.pt``). The folder is written under a temporary name and renamed, so a crash
never leaves a half-written ``step-<N>``; only the last ``keep`` checkpoints are kept.

Under FSDP2 with several processes a checkpoint is *sharded* (:func:`save_sharded_checkpoint`): the
model and optimizer go through ``torch.distributed.checkpoint`` (DCP) into ``sharded/``, where each
rank writes its own ``__<rank>_0.distcp`` file, next to ``colafx.json`` (the model record, no weights),
``trainer.pt`` and ``trainer.json`` (``"format": "sharded"``, the shard files and their sizes). No rank
gathers the full state; the folder is renamed into place as a whole once every rank has written. The
ranks must share the file system of ``root``. DCP reshards on load (resuming on another number of
processes with the same global batch is not tested).
"""
from __future__ import annotations

import json
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
SHARDED_NAME = "sharded"   # the DCP folder of a sharded checkpoint


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


def save_sharded_checkpoint(root: str | os.PathLike, step: int, model: nn.Module, optimizer,
                            scheduler_state: dict, fingerprint: dict, record: dict | None,
                            extra: dict | None = None, keep: int = 2) -> Path:
    """Write the sharded checkpoint ``<root>/step-<step>`` of an FSDP2 ``model`` and its ``optimizer``.

    Collective: every rank calls it; each writes its own shard of the model and optimizer state with
    ``torch.distributed.checkpoint`` (no full state is gathered). Rank 0 passes ``record``
    (:func:`colafx.transform.io.model_record` of the unwrapped model; ignored elsewhere), writes the
    manifest, renames the temporary folder into place and deletes all but the newest ``keep``.

    Raises:
        ValueError: ``keep < 1``.
        RuntimeError: writing failed on some rank (raised on every rank; the temporary folder is
            removed and older checkpoints are kept).
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = Path(root)
    main = dist.get_rank() == 0
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".{final.name}.sharded.tmp"
    if main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run
        tmp.mkdir()
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    error = None
    try:
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp / SHARDED_NAME)
    except Exception as err:  # noqa: BLE001 - reported on every rank below
        error = f"rank {dist.get_rank()}: {err}"
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    errors = [e for e in errors if e]
    if main and not errors:
        try:
            _finish_sharded(tmp, final, step, record, scheduler_state, fingerprint, extra)
        except Exception as err:  # noqa: BLE001
            errors = [f"rank 0: {err}"]
    outcome = [errors]
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0]:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"sharded checkpoint {final} was not written: {'; '.join(outcome[0])}")
    if main:
        for old in checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _finish_sharded(tmp: Path, final: Path, step: int, record: dict, scheduler_state: dict,
                    fingerprint: dict, extra: dict | None) -> None:
    """Rank 0's part of a sharded save: record, trainer state, manifest, then the rename."""
    files.atomic_write_json(tmp / io.CONFIG_NAME, record)
    torch.save({"scheduler": scheduler_state, "rng": rng_state()}, tmp / STATE_NAME)
    shards = {p.name: p.stat().st_size for p in sorted((tmp / SHARDED_NAME).iterdir())}
    files.atomic_write_json(tmp / MANIFEST_NAME, {
        "step": step, "format": "sharded", "fingerprint": fingerprint, "extra": extra or {},
        "state_sha256": files.file_sha256(tmp / STATE_NAME), "shards": shards})
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def load_sharded_state(path: str | os.PathLike, model: nn.Module, optimizer) -> None:
    """Load the model and optimizer shards of sharded checkpoint ``path`` into the (FSDP2-wrapped)
    ``model`` and its ``optimizer``; collective under torchrun. DCP reshards to this job's ranks.

    Raises:
        CheckpointError: the shards do not fit the model or optimizer, or cannot be read.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    try:
        dcp.load(state, checkpoint_id=Path(path) / SHARDED_NAME)
    except Exception as err:  # noqa: BLE001 - DCP wraps failures of any rank in CheckpointException
        raise CheckpointError(f"sharded checkpoint {path} cannot be loaded: {err}") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def load_checkpoint(path: str | os.PathLike, model: nn.Module, fingerprint: dict | None = None,
                    may_differ: tuple[str, ...] = ()) -> dict:
    """Check checkpoint ``path`` and load its weights into ``model`` (unwrapped, same structure).

    ``may_differ``: fingerprint keys allowed to differ (e.g. ``steps`` when a run is extended).
    A sharded checkpoint (:func:`save_sharded_checkpoint`) is checked (manifest, fingerprint, model
    structure, shard files and sizes) but its weights are not loaded: the caller wraps the model and
    calls :func:`load_sharded_state` with ``state["sharded"]``.

    Returns:
        ``{"step", "extra", "fingerprint", "optimizer", "scheduler", "rng", "sharded"}``; the caller
        restores the optimizer, scheduler and RNG (:func:`set_rng_state`) from them. ``sharded`` is
        ``path`` for a sharded checkpoint (then there is no ``optimizer``), else None.

    Raises:
        FileNotFoundError: ``path`` or one of its files is missing.
        CheckpointError: a file is corrupt (bad JSON, SHA-256 mismatch, unreadable tensors, a shard of
            the wrong size), the fingerprint differs from ``fingerprint`` (the differing keys are
            named), or the weights do not fit ``model`` (dense vs CoLA, other rank or shape).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    path = Path(path)
    manifest = _read_manifest(path)
    sharded = manifest.get("format") == "sharded"
    record = _read_sharded_record(path) if sharded else io.read_record(path)
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
    mine = io.model_record(model)["transforms"]
    if record.get("transforms", {}) != json_roundtrip(mine):
        raise CheckpointError(f"checkpoint {path} holds a different model structure (transformations "
                              f"{sorted(record.get('transforms', {}))} vs {sorted(mine)}, or other CoLA ranks)")
    if sharded:
        _check_shards(path, manifest.get("shards") or {})
    else:
        weights = path / io.WEIGHTS_NAME
        if files.file_sha256(weights) != record.get("weights_sha256"):
            raise CheckpointError(f"{weights} is corrupt: its SHA-256 does not match {io.CONFIG_NAME}")
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
    return {"step": int(manifest["step"]), "extra": manifest.get("extra", {}), "fingerprint": saved,
            "optimizer": None, **state, "sharded": path if sharded else None}


def _read_manifest(path: Path) -> dict:
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file() or not (path / STATE_NAME).is_file():
        raise FileNotFoundError(f"checkpoint {path} is incomplete: {MANIFEST_NAME} or {STATE_NAME} is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
        int(manifest["step"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{manifest_path} is corrupt: {err}") from None
    return manifest


def _read_sharded_record(path: Path) -> dict:
    try:
        return json.loads((path / io.CONFIG_NAME).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path} is incomplete: {io.CONFIG_NAME} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path / io.CONFIG_NAME} is corrupt: {err}") from None


def _check_shards(path: Path, shards: dict) -> None:
    folder = path / SHARDED_NAME
    for name, size in shards.items():
        if not (folder / name).is_file():
            raise FileNotFoundError(f"sharded checkpoint {path} is incomplete: {SHARDED_NAME}/{name} is missing")
        if (folder / name).stat().st_size != size:
            raise CheckpointError(f"{folder / name} is corrupt: {(folder / name).stat().st_size} bytes, "
                                  f"{size} when written")


def json_roundtrip(obj):
    """``obj`` as it reads back from JSON (tuples become lists, keys strings)."""
    return json.loads(json.dumps(obj, default=str))
