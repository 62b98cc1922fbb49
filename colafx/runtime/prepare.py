"""``colafx prepare``: stream a corpus (files, or Hugging Face ``datasets`` through ``hf:`` sources,
see :mod:`colafx.runtime.hf_source`), tokenize it in worker processes, write memory-mappable token
shards plus a JSON index — the pre-tokenized data ``colafx pretrain --data DIR`` trains on with memory
independent of the corpus size.

Layout of ``DIR``: ``train-00000.bin`` … (raw ``uint16`` token ids when the vocabulary fits, else
``uint32``; documents joined with EOS), optionally ``val.bin``, and ``index.json`` (shards with token
and document counts and SHA-256, the tokenizer's fingerprint, EOS id, dtype, sources). Each shard is
written to a temporary file and renamed, and the index is rewritten after each shard, so a killed run
resumes after its last finished shard. Shards close at document-batch boundaries, so 1 and N workers
write the same tokens.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from colafx.files import atomic_write_bytes, atomic_write_json, file_sha256
from colafx.runtime import data as D
from colafx.runtime import hf_source

INDEX_NAME = "index.json"
VAL_NAME = "val.bin"
FORMAT_VERSION = 1


@dataclass
class PrepareConfig:
    """One ``colafx prepare`` run (the CLI flags map 1:1 onto these fields)."""

    sources: list = field(default_factory=list)   # files, folders, globs
    tokenizer: str = ""                           # HF folder / tokenizer.json / .gguf
    out: str = "data/prepared"
    workers: int = 1
    shard_tokens: int = 100_000_000               # a shard closes at the first batch boundary past this
    batch_docs: int = 512                         # documents per tokenizer call (and per worker task)
    val_tokens: int = 0                           # hold out this many tokens from the start as val.bin
    val_data: list | None = None                  # or tokenize these sources as val.bin
    progress: bool = True

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if not self.sources:
            raise ValueError("give at least one source (file, folder or glob)")
        if not self.tokenizer:
            raise ValueError("--tokenizer is required (a HF folder, tokenizer.json or .gguf file)")
        for name in ("workers", "shard_tokens", "batch_docs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.val_tokens < 0:
            raise ValueError(f"val_tokens must be >= 0, got {self.val_tokens}")
        if self.val_tokens and self.val_data:
            raise ValueError("give --val-tokens or --val-data, not both")


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of the tokenizer's serialized vocabulary and merges (same tokenizer, same ids)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id fits, else ``uint32``."""
    return np.dtype(np.uint16) if vocab_size <= 2 ** 16 else np.dtype(np.uint32)


_WORKER_TOKENIZER = None
_WORKER_DTYPE = np.dtype(np.int64)


def _init_worker(tokenizer) -> None:
    """Set this process's tokenizer (a loaded one, or a path to load) for :func:`_encode_batch`."""
    global _WORKER_TOKENIZER, _WORKER_DTYPE
    _WORKER_TOKENIZER = D.load_any_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    _WORKER_DTYPE = token_dtype(len(_WORKER_TOKENIZER))


def _encode_batch(docs: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
    """(token ids of the batch with EOS after each document, in the shard dtype; tokens per
    document; UTF-8 bytes)."""
    tok = _WORKER_TOKENIZER
    ids = tok(docs, add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id
    flat = np.fromiter(itertools.chain.from_iterable(row + [eos] for row in ids), dtype=_WORKER_DTYPE)
    return flat, np.array([len(row) + 1 for row in ids], dtype=np.int64), sum(len(d.encode("utf-8")) for d in docs)


def _bounded_imap(pool, batches, ahead: int):
    """``_encode_batch`` over ``batches`` in ``pool``, in order (so N workers write the same tokens
    as one), with at most ``ahead`` batches in flight: ``Pool.imap`` would read the whole corpus into
    its task queue whenever the workers are slower than the reader."""
    from collections import deque

    flight = deque()
    for batch in batches:
        flight.append(pool.apply_async(_encode_batch, (batch,)))
        if len(flight) >= ahead:
            yield flight.popleft().get()
    while flight:
        yield flight.popleft().get()


def _pool(workers: int, tokenizer, path: str):
    """``workers`` tokenizer processes. Where the OS can fork, they are forked from this process
    (which has run no tokenizer or torch threads yet) and share its loaded modules and ``tokenizer``;
    a spawned worker would import torch and transformers again (seconds and ~300 MB each). Before
    forking, ``gc.freeze()`` moves every object to the permanent generation, so no process's garbage
    collector writes to the shared pages (a full collection otherwise copies them into each worker);
    the caller calls ``gc.unfreeze()`` when the pool is gone."""
    import gc
    import multiprocessing as mp

    if "fork" in mp.get_all_start_methods():
        gc.freeze()
        return mp.get_context("fork").Pool(workers, _init_worker, (tokenizer,))
    return mp.get_context("spawn").Pool(workers, _init_worker, (path,))


def _batches(docs, size: int):
    it = iter(docs)
    while batch := list(itertools.islice(it, size)):
        yield batch


def _inputs(sources: list[str]) -> list:
    """Files (``Path``) and ``hf:`` sources (``HFSource``) in the order given; missing inputs raise
    before anything is written."""
    inputs = []
    for source in sources:
        if hf_source.is_hf(source):
            spec = hf_source.parse(source)
            hf_source.check(spec)
            inputs.append(spec)
        else:
            inputs += D.expand_sources([source])
    return inputs


def _input_bytes(inputs: list) -> int | None:
    sizes = [f.stat().st_size if isinstance(f, Path) else hf_source.size_bytes(f) for f in inputs]
    return None if None in sizes else sum(sizes)


def _documents(inputs: list):
    for item in inputs:
        docs = D.iter_path(item) if isinstance(item, Path) else hf_source.iter_documents(item)
        for doc in docs:
            if doc and doc.strip():
                yield doc


def prepare(config: PrepareConfig) -> dict:
    """Tokenize ``config.sources`` into shards under ``config.out``; returns the index.

    Resumes a killed run with the same sources and tokenizer (finished shards are kept and their
    documents skipped); a finished directory is returned as is.

    Raises:
        ValueError: bad settings; an existing index made with another tokenizer or other sources;
            data errors (see :func:`colafx.runtime.data.iter_path`).
        FileNotFoundError: missing sources or tokenizer.
    """
    config.validate()
    tokenizer = D.load_any_tokenizer(config.tokenizer)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {config.tokenizer} has no EOS token to separate documents")
    out = Path(config.out)
    sources = [str(s) for s in config.sources]
    files = _inputs(sources)  # errors for missing inputs before anything is written
    dtype = token_dtype(len(tokenizer))
    index = {"version": FORMAT_VERSION, "tokenizer": {"path": str(config.tokenizer),
             "fingerprint": tokenizer_fingerprint(tokenizer), "vocab_size": len(tokenizer),
             "eos_id": tokenizer.eos_token_id}, "dtype": dtype.name, "sources": sources,
             "shard_tokens": config.shard_tokens, "batch_docs": config.batch_docs,
             "val_tokens": config.val_tokens, "val_data": config.val_data, "shards": [], "val": None,
             "complete": False}
    old = read_index(out) if (out / INDEX_NAME).exists() else None
    if old is not None:
        same = {k: old.get(k) for k in ("tokenizer", "dtype", "sources", "shard_tokens", "batch_docs",
                                        "val_tokens", "val_data")}
        want = {k: json.loads(json.dumps(index[k])) for k in same}
        if same != want:
            diff = sorted(k for k in same if same[k] != want[k])
            raise ValueError(f"{out} holds data prepared with other settings ({', '.join(diff)}); "
                             "use another --out")
        if old["complete"]:
            return old
        _check_shards(out, old)
        index["shards"], index["val"] = old["shards"], old["val"]
    out.mkdir(parents=True, exist_ok=True)
    total_bytes = _input_bytes(files)
    done_docs = sum(s["docs"] for s in index["shards"])
    if not config.val_data:  # --val-tokens: val.bin holds the first documents of the same stream
        done_docs += (index["val"] or {}).get("docs", 0)
    docs = itertools.islice(_documents(files), done_docs, None)
    pool = None
    _init_worker(tokenizer)  # this process encodes --val-data, and everything with one worker
    if config.workers > 1:  # before the progress bar starts its thread
        pool = _pool(config.workers, tokenizer, str(config.tokenizer))
        encoded = _bounded_imap(pool, _batches(docs, config.batch_docs), 4 * config.workers)
    else:
        encoded = map(_encode_batch, _batches(docs, config.batch_docs))
    bar = _progress(config, total_bytes)
    try:
        if config.val_data and index["val"] is None:
            val_docs_iter = _documents(_inputs([str(v) for v in config.val_data]))
            val_tokens, val_docs, _ = _concat(map(_encode_batch, _batches(val_docs_iter, config.batch_docs)))
            index["val"] = _write_shard(out / VAL_NAME, val_tokens, val_docs, dtype)
            atomic_write_json(out / INDEX_NAME, index)
        pending, n_docs, start = [], 0, time.perf_counter()
        want_val = config.val_tokens if index["val"] is None else 0
        for tokens, lengths, size in encoded:
            if bar is not None:
                bar.update(size)
                elapsed = max(time.perf_counter() - start, 1e-9)
                bar.set_postfix(tokens_s=f"{sum(s['tokens'] for s in index['shards']) / elapsed:,.0f}")
            if want_val:  # the first whole documents holding >= val_tokens tokens become val.bin
                have = sum(len(t) for t in pending)
                ends = have + np.cumsum(lengths)
                k = int(np.searchsorted(ends, want_val)) + 1  # documents of this batch that val needs
                if k <= len(lengths):
                    cut = int(lengths[:k].sum())
                    index["val"] = _write_shard(out / VAL_NAME, pending + [tokens[:cut]], n_docs + k, dtype)
                    atomic_write_json(out / INDEX_NAME, index)
                    pending, n_docs, want_val = [tokens[cut:]], len(lengths) - k, 0
                    continue
            pending.append(tokens)
            n_docs += len(lengths)
            have = sum(len(t) for t in pending)
            if not want_val and have >= config.shard_tokens:
                name = f"train-{len(index['shards']):05d}.bin"
                index["shards"].append(_write_shard(out / name, pending, n_docs, dtype))
                pending, n_docs = [], 0
                atomic_write_json(out / INDEX_NAME, index)
        if pending:
            if want_val:
                raise ValueError(f"the corpus has fewer than --val-tokens {config.val_tokens} tokens")
            name = f"train-{len(index['shards']):05d}.bin"
            index["shards"].append(_write_shard(out / name, pending, n_docs, dtype))
    finally:
        if pool is not None:
            import gc

            pool.terminate()
            gc.unfreeze()
        if bar is not None:
            bar.close()
    if not index["shards"]:
        raise ValueError("the sources hold no text for training")
    index["total_tokens"] = sum(s["tokens"] for s in index["shards"])
    index["complete"] = True
    atomic_write_json(out / INDEX_NAME, index)
    return index


def _concat(encoded) -> tuple[list[np.ndarray], int, int]:
    parts = list(encoded)
    if not parts:
        raise ValueError("the validation sources hold no text")
    return [p[0] for p in parts], sum(len(p[1]) for p in parts), sum(p[2] for p in parts)


def _write_shard(path: Path, chunks: list[np.ndarray], docs: int, dtype: np.dtype) -> dict:
    """Write ``chunks`` one after the other as one ``dtype`` shard (atomically; no concatenated copy)."""
    def write(tmp):
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk.astype(dtype, copy=False).tobytes())
    atomic_write_bytes(path, write)
    tokens = sum(len(c) for c in chunks)
    return {"file": path.name, "tokens": int(tokens), "docs": int(docs), "sha256": file_sha256(path)}


def read_index(directory: str | Path) -> dict:
    """The ``index.json`` of a prepared directory.

    Raises:
        FileNotFoundError: no index; ValueError: an index that is not valid JSON or of another version.
    """
    path = Path(directory) / INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a prepared data directory (no {INDEX_NAME})")
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is corrupt: {err}") from None
    if index.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format version {index.get('version')}, this colafx reads {FORMAT_VERSION}")
    return index


def _check_shards(directory: Path, index: dict) -> None:
    """Every listed shard exists with the recorded size (a truncated shard is named)."""
    itemsize = np.dtype(index["dtype"]).itemsize
    for shard in index["shards"] + ([index["val"]] if index.get("val") else []):
        path = directory / shard["file"]
        if not path.is_file():
            raise FileNotFoundError(f"shard {path} listed in {INDEX_NAME} is missing")
        if path.stat().st_size != shard["tokens"] * itemsize:
            raise ValueError(f"shard {path} is truncated or corrupt: {path.stat().st_size} bytes, expected "
                             f"{shard['tokens'] * itemsize}")


def _progress(config: PrepareConfig, total_bytes: int):
    if not config.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare", dynamic_ncols=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``colafx prepare``."""
    d = PrepareConfig()
    parser.add_argument("sources", nargs="+",
                        help="files (.txt/.md/.jsonl/.json.gz/.jsonl.zst/.parquet), folders or globs; or Hugging "
                             "Face datasets, streamed: hf:BUILDER:FILES (BUILDER: json, parquet, text, csv, arrow; "
                             "e.g. 'hf:json:c4/*.json.gz'), hf:DIR[:SPLIT] (a save_to_disk folder, or a folder of "
                             "data files) or hf:NAME[:SPLIT] (a dataset name; set HF_DATASETS_OFFLINE=1 to "
                             "resolve it from the local cache only); SPLIT defaults to train; the 'text' column")
    parser.add_argument("--tokenizer", required=True, help="HF tokenizer folder, tokenizer.json or .gguf file")
    parser.add_argument("--out", required=True, help="output directory (shards + index.json)")
    parser.add_argument("--workers", type=int, default=d.workers, help="tokenizer processes")
    parser.add_argument("--shard-tokens", type=int, default=d.shard_tokens, help="tokens per shard (about)")
    parser.add_argument("--batch-docs", type=int, default=d.batch_docs, help="documents per tokenizer call")
    val = parser.add_mutually_exclusive_group()
    val.add_argument("--val-tokens", type=int, default=0, help="hold out this many tokens as val.bin")
    val.add_argument("--val-data", nargs="+", default=None,
                     help="sources (as above, hf: included) tokenized into val.bin")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="hide the progress bar (default: shown)")


def run_cli(args: argparse.Namespace) -> int:
    """Run ``colafx prepare`` and print the totals."""
    config = PrepareConfig(sources=args.sources, tokenizer=args.tokenizer, out=args.out, workers=args.workers,
                           shard_tokens=args.shard_tokens, batch_docs=args.batch_docs, val_tokens=args.val_tokens,
                           val_data=args.val_data, progress=args.progress)
    start = time.perf_counter()
    index = prepare(config)
    seconds = time.perf_counter() - start
    val = index.get("val") or {}
    print(f"{index['total_tokens']:,} training tokens in {len(index['shards'])} shard(s) ({index['dtype']}), "
          f"{val.get('tokens', 0):,} validation tokens -> {config.out} ({seconds:.1f} s)")
    return 0
