"""Pre-training data: corpora, tokenizers, packing into fixed-length blocks, deterministic batches.

* Corpora: local ``.txt``/``.md`` (one document per file), ``.jsonl`` (a ``"text"`` field per line),
  ``.parquet`` (a ``"text"`` column, needs ``pyarrow``), any iterable of strings or of dicts with a
  ``"text"`` key (a Hugging Face ``datasets.Dataset`` works), or :func:`embedded_corpus`: English
  text that ships with every CPython (``pydoc_data.topics`` and the standard library's docstrings).
* Tokenizers: a Hugging Face tokenizer folder, a ``tokenizer.json`` file, a GGUF file, or a
  byte-level BPE trained on the training texts with ``tokenizers`` (:func:`train_tokenizer`).
* :func:`pack` concatenates documents (EOS between them) into ``seq_len + 1`` token blocks.
* :class:`BlockStream` yields the blocks of step ``s`` in a seeded order; the position in the
  stream is the step number, so resuming and data-parallel sharding need no extra state.
"""
from __future__ import annotations

import inspect
import json
import os
import random
import re
import sysconfig
from pathlib import Path
from typing import Iterable

import torch

from colafx.runtime import hf_source

EOS_TOKEN = "<|endoftext|>"
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".raw", ".tokens")
_ENCODE_CHUNK = 2_000  # lines per tokenizer call when encoding a large text file
_DOCSTRING = re.compile(r'"""(.*?)"""', re.S)


def embedded_corpus(min_docstring_chars: int = 200) -> list[str]:
    """English text available on every machine without files or network: the ``pydoc`` help
    topics shipped with CPython (``pydoc_data.topics``, ~0.5 MB) plus the module, class and function
    triple-quoted docstrings (mostly prose) of the top-level standard-library ``.py`` files (~0.7 MB),
    in a fixed order.

    The exact text depends on the Python version.

    Raises:
        RuntimeError: this Python ships neither (a stripped-down install).
    """
    docs: list[str] = []
    try:
        from pydoc_data.topics import topics

        docs += [topics[k] for k in sorted(topics)]
    except ImportError:
        pass
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")):
        try:
            source = path.read_text(encoding="utf-8", errors="ignore")
        except OSError:
            continue
        # A regex is ~10x faster than ast.parse; the prose filter drops code templates.
        for match in _DOCSTRING.finditer(source):
            doc = inspect.cleandoc(match.group(1))
            if len(doc) >= min_docstring_chars and _prose_share(doc) >= 0.85:
                docs.append(doc)
    if not docs:
        raise RuntimeError("this Python has neither pydoc_data nor standard-library sources; pass --data")
    return docs


def _prose_share(text: str) -> float:
    return sum(c.isalpha() or c.isspace() for c in text) / len(text)


def read_texts(source) -> list[str]:
    """Read documents from ``source``: a path (file or folder of supported files), an ``hf:`` source
    (:mod:`colafx.runtime.hf_source`), a list of those, or an iterable of strings / dicts with a
    ``"text"`` key (e.g. a ``datasets.Dataset``).

    Raises:
        FileNotFoundError: a path does not exist, or a folder holds no supported file.
        ValueError: an unsupported file type, a JSONL line without ``"text"``, or no text at all.
        ImportError: a parquet file without ``pyarrow`` installed.
    """
    if isinstance(source, (str, os.PathLike)):
        source = [source]
    docs: list[str] = []
    for item in source:
        if hf_source.is_hf(item):
            docs += list(hf_source.iter_documents(hf_source.parse(item)))
        elif isinstance(item, (str, os.PathLike)) and not (isinstance(item, str) and _looks_like_text(item)):
            docs += [doc for path in expand_sources([item]) for doc in iter_path(path)]
        elif isinstance(item, dict):
            if "text" not in item:
                raise ValueError(f"dataset rows need a 'text' field; got keys {sorted(item)}")
            docs.append(item["text"])
        elif isinstance(item, str):
            docs.append(item)
        else:
            raise ValueError(f"cannot read text from a {type(item).__name__}")
    docs = [d for d in docs if d and d.strip()]
    if not docs:
        raise ValueError("the data holds no text")
    return docs


def _looks_like_text(item: str) -> bool:
    # A string that cannot be a path (too long or multi-line) is a document, not a file name.
    return "\n" in item or len(item) > 1024



def _kind(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in (".jsonl.zst", ".json.zst", ".jsonl.gz", ".json.gz", ".jsonl", ".parquet"):
        if name.endswith(suffix):
            return suffix
    return "text" if path.suffix in TEXT_SUFFIXES or not path.suffix else None


def expand_sources(sources) -> list[Path]:
    """Files named by ``sources`` (paths, folders searched recursively, or globs), in a fixed order.

    Raises:
        FileNotFoundError: a path or glob matches nothing, or a folder holds no supported file.
    """
    import glob

    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    files: list[Path] = []
    for source in sources:
        text = str(source)
        if any(c in text for c in "*?[") and not Path(text).exists():
            matches = sorted(Path(m) for m in glob.glob(text, recursive=True))
            if not matches:
                raise FileNotFoundError(f"data glob {text} matches no file")
            files += [m for m in matches if m.is_file()]
            continue
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"data path {path} does not exist")
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p) is not None
                           and not p.name.startswith("."))
            if not found:
                raise FileNotFoundError(f"no .txt/.md/.jsonl/.json.gz/.jsonl.zst/.parquet files in {path}")
            files += found
        else:
            files.append(path)
    return files


def iter_path(path: Path):
    """Stream the documents of one file: a ``.txt``/``.md`` file is one document; ``.jsonl``,
    ``.json.gz`` / ``.jsonl.gz`` (C4's ``c4-train.00000-of-01024.json.gz``) and ``.jsonl.zst`` hold one
    JSON object with a ``"text"`` field per line; ``.parquet`` a ``"text"`` column (read in batches).

    Raises:
        ValueError: an unsupported file, a line that is not JSON or has no ``"text"``.
        ImportError: ``.parquet`` without ``pyarrow``, ``.zst`` without ``zstandard``.
    """
    kind = _kind(path)
    if kind is None:
        raise ValueError(f"unsupported data file {path}: use .txt/.md, .jsonl, .json.gz, .jsonl.zst or .parquet")
    if kind == "text":
        yield path.read_text(encoding="utf-8")
        return
    if kind == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from None
        for batch in pq.ParquetFile(path).iter_batches(columns=["text"], batch_size=4096):
            yield from (t for t in batch.column(0).to_pylist() if t)
        return
    with _open_lines(path, kind) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno} is not valid JSON: {err}") from None
            if not isinstance(row, dict) or "text" not in row:
                raise ValueError(f"{path}:{lineno} has no 'text' field")
            yield row["text"]


def _open_lines(path: Path, kind: str):
    import io

    if kind.endswith(".gz"):
        import gzip

        return gzip.open(path, "rt", encoding="utf-8")
    if kind.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise ImportError(f"reading {path} needs zstandard: pip install zstandard") from None
        raw = open(path, "rb")
        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True), encoding="utf-8")
    return open(path, encoding="utf-8")


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Train a byte-level BPE with ``vocab_size`` entries (``<|endoftext|>`` included) on ``texts``.

    Returns:
        a ``transformers.PreTrainedTokenizerFast`` (save it with ``save_pretrained``).

    Raises:
        ValueError: ``vocab_size`` is smaller than the 256 byte tokens plus EOS.
    """
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 257:
        raise ValueError(f"a byte-level BPE needs vocab_size >= 257, got {vocab_size}")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS_TOKEN],
                            show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=EOS_TOKEN,
                                   bos_token=EOS_TOKEN, unk_token=EOS_TOKEN)


def load_any_tokenizer(path: str | os.PathLike):
    """Load a tokenizer from a Hugging Face folder, a ``tokenizer.json`` file, a ``.gguf`` file, a
    colafx run folder (``model/tokenizer``) or ``"smollm2"``.

    Raises:
        FileNotFoundError: nothing tokenizer-like at ``path``.
    """
    from colafx.runtime.models import load_tokenizer

    p = Path(path)
    if p.is_file() and p.suffix == ".json":
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast(tokenizer_file=str(p))
        if tok.eos_token is None and EOS_TOKEN in tok.get_vocab():
            tok.eos_token = EOS_TOKEN
        return tok
    if p.is_dir() and (p / "model" / "tokenizer").is_dir():
        p = p / "model" / "tokenizer"
    return load_tokenizer(p if p.exists() else path)


def encode(texts: Iterable[str], tokenizer) -> list[list[int]]:
    """Token ids of each document (no special tokens added; large documents encoded in chunks)."""
    out = []
    for text in texts:
        lines = text.splitlines(keepends=True) or [text]
        ids: list[int] = []
        for i in range(0, len(lines), _ENCODE_CHUNK):
            chunk = "".join(lines[i:i + _ENCODE_CHUNK])
            ids += tokenizer(chunk, add_special_tokens=False)["input_ids"]
        out.append(ids)
    return out


def pack(docs: list[list[int]], seq_len: int, eos_id: int | None) -> torch.Tensor:
    """Concatenate documents (``eos_id`` after each) and cut the stream into ``[n, seq_len + 1]``
    blocks: a block gives ``seq_len`` inputs and their ``seq_len`` next-token targets. The tail that
    does not fill a block is dropped.

    Raises:
        ValueError: ``seq_len < 1`` or fewer tokens than one block.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    flat = []
    for d in docs:
        flat += d
        if eos_id is not None:
            flat.append(eos_id)
    n = len(flat) // (seq_len + 1)
    if n == 0:
        raise ValueError(f"only {len(flat)} tokens: not enough for one block of {seq_len + 1}")
    return torch.tensor(flat[: n * (seq_len + 1)], dtype=torch.long).view(n, seq_len + 1)


def split_documents(docs: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Shuffle documents with ``seed`` and hold out about ``val_fraction`` of the characters
    (whole documents, at least one) for validation; a single document gives its tail.

    Raises:
        ValueError: ``val_fraction`` not in (0, 1), no documents, or one document without line breaks.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(docs) == 1:  # one big file: hold out its tail, cut at a line break
        text = docs[0]
        cut = text.rfind("\n", 0, int(len(text) * (1 - val_fraction)))
        if cut <= 0:
            raise ValueError("a single document with no line break cannot be split for validation; pass --val-data")
        return [text[:cut + 1]], [text[cut + 1:]]
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    total = sum(len(d) for d in docs)
    val, size = [], 0
    for i in order:
        if size >= val_fraction * total or len(val) == len(docs) - 1:
            break
        val.append(i)
        size += len(docs[i])
    held = set(val)
    return [docs[i] for i in order if i not in held], [docs[i] for i in val]


class BlockStream:
    """Training blocks in a seeded order, epoch after epoch; step ``s`` of a run with global batch
    ``B`` reads stream positions ``[s·B, (s+1)·B)``, and rank ``r`` of ``w`` reads its slice of those.
    """

    def __init__(self, blocks: torch.Tensor, seed: int):
        self.blocks, self.seed = blocks, seed
        self._perms: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.blocks)

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(len(self.blocks), generator=g)}
        return self._perms[epoch]

    def batch(self, step: int, global_batch: int, rank: int = 0, world: int = 1) -> torch.Tensor:
        """The ``[global_batch // world, seq_len + 1]`` blocks of ``rank`` at ``step``.

        Raises:
            ValueError: ``global_batch`` is not divisible by ``world``.
        """
        positions = stream_positions(step, global_batch, rank, world)
        idx = [self._perm(p // len(self.blocks))[p % len(self.blocks)] for p in positions]
        return self.blocks[torch.stack(idx)]


def stream_positions(step: int, global_batch: int, rank: int = 0, world: int = 1) -> range:
    """The stream positions rank ``rank`` of ``world`` reads at ``step``: its slice of
    ``[step·B, (step+1)·B)``.

    Raises:
        ValueError: ``global_batch`` is not divisible by ``world``.
    """
    if global_batch % world:
        raise ValueError(f"global batch {global_batch} is not divisible by {world} processes")
    local = global_batch // world
    start = step * global_batch + rank * local
    return range(start, start + local)


class PreparedCorpus:
    """Training windows of ``seq_len + 1`` tokens read from the memory-mapped shards that
    ``colafx prepare`` wrote; the same ``batch(step, ...)`` contract as :class:`BlockStream`.

    Window ``i`` of epoch ``e`` is window ``(a·i + b) mod N`` of the shards in order, with ``a``
    coprime to ``N`` and ``a, b`` drawn from ``seed`` and ``e``: a seeded permutation that needs no
    memory, so memory does not grow with the corpus. Windows never cross a shard boundary.

    Raises:
        FileNotFoundError / ValueError: no index, a missing or truncated shard (see
            :func:`colafx.runtime.prepare.read_index`), or fewer tokens than one window.
    """

    def __init__(self, directory: str | os.PathLike, seq_len: int, seed: int = 0):
        import numpy as np

        from colafx.runtime.prepare import _check_shards, read_index

        self.directory, self.window, self.seed = Path(directory), seq_len + 1, seed
        self.index = read_index(self.directory)
        if not self.index.get("complete"):
            raise ValueError(f"{directory} is not finished: run colafx prepare again to resume it")
        _check_shards(self.directory, self.index)
        self.dtype = np.dtype(self.index["dtype"])
        counts = [s["tokens"] // self.window for s in self.index["shards"]]
        self.starts = np.cumsum([0] + counts)
        if self.starts[-1] == 0:
            raise ValueError(f"{directory} holds fewer than {self.window} tokens: no training window")
        self._maps: dict[int, object] = {}
        self._affine = (-1, 1, 0)  # (epoch, a, b) of the last epoch read

    def __len__(self) -> int:
        return int(self.starts[-1])

    def fingerprint(self) -> str:
        """SHA-256 over the shards' checksums and the window length (what resume compares)."""
        import hashlib

        payload = json.dumps([[s["sha256"] for s in self.index["shards"]], self.window])
        return hashlib.sha256(payload.encode()).hexdigest()

    def _map(self, shard: int):
        import numpy as np

        if shard not in self._maps:
            path = self.directory / self.index["shards"][shard]["file"]
            self._maps[shard] = np.memmap(path, dtype=self.dtype, mode="r")
        return self._maps[shard]

    def _position(self, p: int) -> int:
        import math

        n = len(self)
        epoch, i = divmod(p, n)
        if self._affine[0] != epoch:  # (a, b) of this epoch, drawn once (seeding a Random is slow)
            rng = random.Random(self.seed * 1_000_003 + epoch)
            a = rng.randrange(1, max(n, 2))
            while math.gcd(a, n) != 1:
                a = a % n + 1
            self._affine = (epoch, a, rng.randrange(n))
        _, a, b = self._affine
        return (a * i + b) % n

    def window_at(self, w: int) -> torch.Tensor:
        """Window ``w`` (in shard order) as int64 token ids."""
        import numpy as np

        shard = int(np.searchsorted(self.starts, w, side="right") - 1)
        offset = (w - int(self.starts[shard])) * self.window
        return torch.from_numpy(np.asarray(self._map(shard)[offset: offset + self.window], dtype=np.int64))

    def batch(self, step: int, global_batch: int, rank: int = 0, world: int = 1) -> torch.Tensor:
        """The ``[global_batch // world, seq_len + 1]`` windows of ``rank`` at ``step``.

        Raises:
            ValueError: ``global_batch`` is not divisible by ``world``.
        """
        positions = stream_positions(step, global_batch, rank, world)
        return torch.stack([self.window_at(self._position(p)) for p in positions])


def prepared_val_blocks(directory: str | os.PathLike, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """The validation windows of a prepared directory (``val.bin``), at most ``max_tokens`` tokens.

    Raises:
        ValueError: the directory has no ``val.bin`` (prepare with --val-tokens or --val-data).
    """
    import numpy as np

    from colafx.runtime.prepare import read_index

    index = read_index(directory)
    if not index.get("val"):
        raise ValueError(f"{directory} has no validation shard: prepare it with --val-tokens or --val-data, "
                         "or pass --val-data to pretrain")
    tokens = np.fromfile(Path(directory) / index["val"]["file"], dtype=np.dtype(index["dtype"]))
    if max_tokens:
        tokens = tokens[: max(max_tokens, seq_len + 1)]
    n = len(tokens) // (seq_len + 1)
    if n == 0:
        raise ValueError(f"{directory}/val.bin holds fewer than {seq_len + 1} tokens")
    return torch.from_numpy(tokens[: n * (seq_len + 1)].astype(np.int64)).view(n, seq_len + 1)


def is_prepared(source) -> bool:
    """True if ``source`` (or the single item of a list) is a directory written by ``colafx prepare``."""
    if isinstance(source, (list, tuple)) and len(source) == 1:
        source = source[0]
    return isinstance(source, (str, os.PathLike)) and (Path(source) / "index.json").is_file()


def calibration_ids(source, tokenizer, tokens: int = 8192, window: int = 256) -> torch.Tensor:
    """The first ``tokens`` tokens of ``source`` (anything :func:`read_texts` reads) as ids
    [tokens // window, window], for GPTQ calibration; documents are read until enough tokens.

    Raises:
        FileNotFoundError / ValueError: as :func:`read_texts`; ValueError for fewer than ``window``
            tokens or non-positive sizes.
    """
    if tokens < 1 or window < 1:
        raise ValueError(f"tokens and window must be positive, got {tokens} and {window}")
    ids: list[int] = []
    for doc in read_texts(source):
        ids += encode([doc[: 8 * (tokens - len(ids)) + 1024]], tokenizer)[0]  # ~4 characters a token
        if len(ids) >= tokens:
            break
    if len(ids) < window:
        raise ValueError(f"the calibration text holds {len(ids)} tokens, fewer than one window of {window}")
    n = min(len(ids), tokens) // window
    return torch.tensor(ids[: n * window], dtype=torch.long).view(n, window)
