"""Hugging Face ``datasets`` as a document source: ``hf:...`` arguments of ``colafx prepare``.

Spellings (``SPLIT`` defaults to ``train``):

* ``hf:BUILDER:FILES`` — one of ``datasets``' packaged builders (``json``, ``parquet``, ``text``,
  ``csv``, ``arrow``) over local files or a glob, read with ``streaming=True``
  (``load_dataset(BUILDER, data_files=FILES, split="train", streaming=True)``); ``text`` reads each
  file as one document (``sample_by="document"``, as ``colafx`` reads ``.txt`` files).
* ``hf:DIR[:SPLIT]`` — a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``
  (``load_from_disk``, memory-mapped Arrow, iterated as an ``IterableDataset``).
* ``hf:NAME_OR_DIR[:SPLIT]`` — anything else ``load_dataset(NAME_OR_DIR, split=SPLIT,
  streaming=True)`` resolves: a folder of data files, or a dataset name. Nothing here forces network
  access: with ``HF_DATASETS_OFFLINE=1`` / ``HF_HUB_OFFLINE=1`` a name resolves only from the local
  cache.

Documents are the ``text`` column; empty rows are skipped. Rows stream in batches, so memory does
not grow with the dataset.
"""
from __future__ import annotations

import glob
import re
from dataclasses import dataclass
from pathlib import Path

PREFIX = "hf:"
BUILDERS = ("json", "parquet", "text", "csv", "arrow")
TEXT_FIELD = "text"
_BATCH = 1024
_SPLIT = re.compile(r"^[A-Za-z_][\w.\-]*(\[[^\]]*\])?$")  # train, validation, train[:10%]


@dataclass(frozen=True)
class HFSource:
    """A parsed ``hf:`` argument."""

    spec: str            # as given, e.g. "hf:json:c4/*.json.gz"
    target: str          # files / glob (with a builder), a folder or a dataset name
    builder: str | None  # packaged builder, or None
    split: str = "train"

    @property
    def on_disk(self) -> bool:
        """Written by ``save_to_disk`` (a ``Dataset`` or a ``DatasetDict`` folder)."""
        folder = Path(self.target)
        return self.builder is None and folder.is_dir() and any(
            (folder / name).is_file() for name in ("state.json", "dataset_dict.json"))


def is_hf(source) -> bool:
    """Whether ``source`` is an ``hf:`` argument."""
    return isinstance(source, str) and source.startswith(PREFIX)


def parse(spec: str) -> HFSource:
    """Parse ``hf:BUILDER:FILES`` or ``hf:NAME_OR_DIR[:SPLIT]``.

    Raises:
        ValueError: nothing after ``hf:``, or a builder without files.
    """
    rest = spec[len(PREFIX):]
    if not rest:
        raise ValueError(f"{spec!r}: give hf:BUILDER:FILES, hf:DIR[:SPLIT] or hf:NAME[:SPLIT]")
    head, sep, tail = rest.partition(":")
    if head in BUILDERS and sep:
        if not tail:
            raise ValueError(f"{spec!r}: give the files after hf:{head}: (a path or a glob)")
        return HFSource(spec, tail, head)
    if not Path(rest).exists():
        for i, c in enumerate(rest):
            if c == ":" and i and _SPLIT.match(rest[i + 1:]):
                return HFSource(spec, rest[:i], None, rest[i + 1:])
    return HFSource(spec, rest, None)


def check(source: HFSource) -> None:
    """Fail early, before anything is written, for local inputs that do not exist.

    Raises:
        FileNotFoundError: a builder's files match nothing; ImportError: ``datasets`` is missing.
    """
    _datasets()
    if source.builder is not None and not _files(source):
        raise FileNotFoundError(f"{source.spec}: {source.target} matches no file")


def size_bytes(source: HFSource) -> int | None:
    """Bytes of the local files behind ``source`` (for a progress bar), or None when unknown."""
    if source.builder is not None:
        return sum(Path(f).stat().st_size for f in _files(source))
    if source.on_disk:
        return sum(p.stat().st_size for p in Path(source.target).rglob("*.arrow"))
    return None


def iter_documents(source: HFSource):
    """Stream the non-empty ``text`` values of ``source``.

    Raises:
        ImportError: ``datasets`` is not installed.
        FileNotFoundError: a missing folder or files, an unknown dataset name (offline or not cached),
            a split the dataset does not have.
        ValueError: the dataset has no ``text`` column (its columns are named).
    """
    stream = _open(source)
    columns = stream.column_names
    if columns is not None and TEXT_FIELD not in columns:
        raise ValueError(f"{source.spec} has no {TEXT_FIELD!r} column (columns: {', '.join(columns)})")
    for batch in stream.iter(batch_size=_BATCH):
        if TEXT_FIELD not in batch:
            raise ValueError(f"{source.spec} has no {TEXT_FIELD!r} column (columns: {', '.join(batch)})")
        yield from (t for t in batch[TEXT_FIELD] if t and t.strip())


def _open(source: HFSource):
    """The ``IterableDataset`` of ``source`` (streaming)."""
    datasets = _datasets()
    try:
        if source.builder is not None:
            kwargs = {"sample_by": "document"} if source.builder == "text" else {}
            return datasets.load_dataset(source.builder, data_files=_files(source) or source.target,
                                         split="train", streaming=True, **kwargs)
        if source.on_disk:
            data = datasets.load_from_disk(source.target)
            if isinstance(data, datasets.DatasetDict):
                if source.split not in data:
                    raise FileNotFoundError(f"{source.spec}: no split {source.split!r} "
                                            f"(splits: {', '.join(data)})")
                data = data[source.split]
            return data.to_iterable_dataset()
        return datasets.load_dataset(source.target, split=source.split, streaming=True)
    except (FileNotFoundError, ValueError) as err:
        raise FileNotFoundError(f"{source.spec} cannot be read: {_first_line(err)}") from None
    except ConnectionError as err:
        raise FileNotFoundError(f"{source.spec} is not available locally and cannot be downloaded: "
                                f"{_first_line(err)}") from None


def _files(source: HFSource) -> list[str]:
    target = source.target
    if any(c in target for c in "*?[") and not Path(target).exists():
        return sorted(f for f in glob.glob(target, recursive=True) if Path(f).is_file())
    path = Path(target)
    if path.is_dir():
        return sorted(str(p) for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    return [target] if path.is_file() else []


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _datasets():
    try:
        import datasets
    except ImportError:
        raise ImportError("hf: sources need Hugging Face datasets: pip install datasets") from None
    return datasets
