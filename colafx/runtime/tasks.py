"""Prompt-based classification (MeZO's recipe) and causal-LM text loss.

A :class:`PromptTask` turns an example's fields into ``template.format(**fields)`` followed by one of
the label words. Training loss: cross-entropy on the gold label word's tokens only. Prediction: the
candidate whose tokens have the highest mean log-probability. Readers: GLUE TSV (header row) and
JSONL; :func:`sample_per_class` draws k examples per class with a seed.
"""
from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from colafx.runtime.device import model_device, to_device


@dataclass(frozen=True)
class Example:
    """One classification example: its text fields and its label index."""

    fields: dict
    label: int


@dataclass(frozen=True)
class PromptTask:
    """``template`` (``str.format`` fields of the example) followed by ``label_words[label]``.

    ``label_field`` names the column holding the label: an int index, or one of ``label_names``.
    """

    template: str
    label_words: tuple[str, ...]
    label_field: str = "label"
    label_names: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if len(self.label_words) < 2:
            raise ValueError(f"a classification task needs at least 2 label words, got {list(self.label_words)}")

    def prompt(self, example: Example) -> str:
        """The prompt text of ``example`` (without a label word).

        Raises:
            ValueError: the template names a field the example does not have.
        """
        try:
            return self.template.format(**example.fields)
        except KeyError as err:
            raise ValueError(f"template {self.template!r} needs field {err} but the example has "
                             f"{sorted(example.fields)}") from None


SST2 = PromptTask(template="{sentence} It was", label_words=(" terrible", " great"))
"""SST-2 as in MeZO: ``"{sentence} It was {terrible|great}"``."""

TASKS = {"sst2": SST2}


def _parse_label(task: PromptTask, value, where: str) -> int:
    text = str(value).strip()
    if task.label_names and text in task.label_names:
        return task.label_names.index(text)
    try:
        label = int(text)
    except ValueError:
        raise ValueError(f"{where}: label {value!r} is neither an index nor one of {list(task.label_names)}") from None
    if not 0 <= label < len(task.label_words):
        raise ValueError(f"{where}: label {label} is outside [0, {len(task.label_words)})")
    return label


def _to_examples(task: PromptTask, rows, path: Path) -> list[Example]:
    examples = []
    for i, row in enumerate(rows):
        if task.label_field not in row:
            raise ValueError(f"{path} row {i + 1}: no {task.label_field!r} column (columns: {sorted(row)})")
        label = _parse_label(task, row[task.label_field], f"{path} row {i + 1}")
        examples.append(Example({k: (v.strip() if isinstance(v, str) else v) for k, v in row.items()
                                 if k != task.label_field}, label))
    if not examples:
        raise ValueError(f"{path} holds no examples")
    return examples


def read_examples(path: str | Path, task: PromptTask) -> list[Example]:
    """Read classification examples from a GLUE-style TSV (header row) or a JSONL file.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unknown extension, malformed JSON, a missing label column, or a bad label.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    if path.suffix in (".tsv", ".txt"):
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    elif path.suffix in (".jsonl", ".json"):
        rows = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path} line {i + 1} is not valid JSON: {err}") from None
    else:
        raise ValueError(f"{path}: expected a .tsv or .jsonl file")
    return _to_examples(task, rows, path)


def sample_per_class(examples: list[Example], k: int, seed: int = 0) -> list[Example]:
    """``k`` examples of every class drawn with ``seed`` (shuffled); all of them if ``k`` <= 0.

    Raises:
        ValueError: a class has fewer than ``k`` examples.
    """
    rng = random.Random(seed)
    if k <= 0:
        out = list(examples)
    else:
        by_class: dict[int, list[Example]] = {}
        for ex in examples:
            by_class.setdefault(ex.label, []).append(ex)
        out = []
        for label in sorted(by_class):
            if len(by_class[label]) < k:
                raise ValueError(f"class {label} has {len(by_class[label])} examples, fewer than k={k}")
            out += rng.sample(by_class[label], k)
    rng.shuffle(out)
    return out


class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 0..255, BOS 256): a tokenizer for random-init presets."""

    bos_token_id, eos_token_id, pad_token_id = 256, 257, 258

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (BOS first when ``add_special_tokens``)."""
        return ([self.bos_token_id] if add_special_tokens else []) + list(text.encode("utf-8"))

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        """``{"input_ids": encode(text)}``, as a Hugging Face tokenizer answers."""
        return {"input_ids": self.encode(text, add_special_tokens)}


@dataclass
class Batch:
    """Right-padded sequences with a mask of the positions whose next token is a target."""

    input_ids: torch.Tensor       # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    targets: torch.Tensor         # [B, T]: token at t+1 where scored, else -100

    def to(self, device: torch.device) -> "Batch":
        """The same batch on ``device`` (pinned, non-blocking copies to CUDA)."""
        return Batch(*(to_device(t, device) for t in (self.input_ids, self.attention_mask, self.targets)))


def encode_pairs(tokenizer, prompts: list[str], words: list[str], max_length: int = 256) -> Batch:
    """Encode ``prompt + word`` pairs; the word's tokens are the scored targets. Long prompts are
    truncated on the left so the word always fits."""
    seqs, targets = [], []
    for prompt, word in zip(prompts, words):
        p = tokenizer.encode(prompt, add_special_tokens=True)
        w = tokenizer.encode(word, add_special_tokens=False)
        p = p[-(max_length - len(w)):]
        seqs.append(p + w)
        targets.append([-100] * (len(p) - 1) + w + [-100])
    length = max(len(s) for s in seqs)
    pad = 0 if getattr(tokenizer, "pad_token_id", None) is None else tokenizer.pad_token_id
    ids = torch.full((len(seqs), length), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    tgt = torch.full((len(seqs), length), -100, dtype=torch.long)
    for i, (s, t) in enumerate(zip(seqs, targets)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        tgt[i, : len(t)] = torch.tensor(t)
    return Batch(ids, mask, tgt)


def scored_logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Logits [n_targets, vocab] at the scored positions of ``batch`` (row-major order).

    Only those positions go through the logits head: the [B, T, vocab] logits of a 49k-vocab model
    would dominate memory.
    """
    batch = batch.to(model_device(model))
    where = batch.targets != -100
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if backbone is not None and head is not None and backbone is not model:
        hidden = backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)[0]
        return head(hidden[where])
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits[where]


def target_logprobs(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the target tokens: ``(logp [n_targets], row index [n_targets])``."""
    batch = batch.to(model_device(model))
    where = batch.targets != -100
    logits = scored_logits(model, batch)
    logp = F.log_softmax(logits.float(), dim=-1).gather(1, batch.targets[where][:, None])[:, 0]
    return logp, where.nonzero()[:, 0]


def _mean_per_row(values: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    total = torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, rows, values)
    count = torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, rows, torch.ones_like(values))
    return total / count


OBJECTIVES = ("vocab", "candidates")


def candidate_scores(model: nn.Module, tokenizer, task: PromptTask, examples: list[Example]) -> torch.Tensor:
    """Score [n, n_labels] of every label word per example: its mean token log-probability."""
    prompts = [task.prompt(e) for e in examples]
    n, c = len(examples), len(task.label_words)
    words = [tokenizer.encode(w, add_special_tokens=False) for w in task.label_words]
    if all(len(w) == 1 for w in words):  # one forward: every candidate is read at the same position
        logits = scored_logits(model, encode_pairs(tokenizer, prompts, [task.label_words[0]] * n))
        return F.log_softmax(logits.float(), dim=-1)[:, [w[0] for w in words]]
    batch = encode_pairs(tokenizer, [p for p in prompts for _ in range(c)], list(task.label_words) * n)
    logp, rows = target_logprobs(model, batch)
    return _mean_per_row(logp, rows, n * c).view(n, c)


def label_loss(model: nn.Module, tokenizer, task: PromptTask, examples: list[Example],
               objective: str = "vocab") -> torch.Tensor:
    """Training loss of a prompt-based classification batch.

    ``objective="vocab"``: mean cross-entropy of the gold label word over the whole vocabulary
    (per-example mean over the word's tokens; the QuZO / MeZO papers' language-model loss).
    ``"candidates"``: cross-entropy over the label words only, scored as in :func:`predict` (MeZO's
    ``train_as_classification``): it trains the decision itself, not the words' overall likelihood.

    Raises:
        ValueError: unknown ``objective``.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")
    if objective == "candidates":
        scores = candidate_scores(model, tokenizer, task, examples)
        return F.cross_entropy(scores, torch.tensor([e.label for e in examples], device=scores.device))
    batch = encode_pairs(tokenizer, [task.prompt(e) for e in examples], [task.label_words[e.label] for e in examples])
    logp, rows = target_logprobs(model, batch)
    return -_mean_per_row(logp, rows, len(examples)).mean()


@torch.no_grad()
def predict(model: nn.Module, tokenizer, task: PromptTask, examples: list[Example]) -> torch.Tensor:
    """Predicted label per example: the candidate word with the highest mean token log-prob."""
    return candidate_scores(model, tokenizer, task, examples).argmax(dim=1)


def accuracy(model: nn.Module, tokenizer, task: PromptTask, examples: list[Example], batch_size: int = 32) -> float:
    """Fraction of ``examples`` whose predicted label is right (model run in eval mode, no grad)."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i: i + batch_size]
        pred = predict(model, tokenizer, task, chunk)
        correct += int((pred.cpu() == torch.tensor([e.label for e in chunk])).sum())
    model.train(was_training)
    return correct / max(1, len(examples))


def read_text_blocks(path: str | Path, tokenizer, seq_len: int) -> torch.Tensor:
    """Tokenize a text file and cut it into [n_blocks, seq_len] blocks for causal-LM loss.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the text is shorter than one block.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} does not exist")
    ids = tokenizer.encode(path.read_text(encoding="utf-8"), add_special_tokens=False)
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"{path} has {len(ids)} tokens, fewer than one block of {seq_len}")
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def text_loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``input_ids`` [B, T] (causal-LM loss)."""
    input_ids = to_device(input_ids, model_device(model))
    logits = model(input_ids=input_ids, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())
