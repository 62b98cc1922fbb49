"""CoLA (or dense) pre-training of a LLaMA: ``colafx pretrain`` and ``train(PretrainConfig(...))``.

The recipe follows the CoLA paper's code: AdamW (weight decay 0.01), gradient clipping 0.5, linear
warmup then cosine decay to 0.1x the peak LR. Validation loss is the mean over *all* held-out tokens.
Under ``torchrun`` it trains data-parallel (DDP, or FSDP2 ``fully_shard`` with ``fsdp=True``): each
rank reads its own slice of every global batch and only rank 0 writes files, except FSDP2
checkpoints, where each rank writes its shard (``torch.distributed.checkpoint``).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from colafx.runtime import checkpoint as ckpt
from colafx.runtime import data as D
from colafx.runtime import distributed as dist_utils
from colafx.runtime.device import DEVICE_HELP, environment, model_device, resolve_device, synchronize, to_device

# --dtype: the weights' dtype, and whether the forward runs under bf16 autocast.
#   fp32           fp32 weights and math
#   bf16           pure bf16 weights, gradients and AdamW state, as the CoLA paper's code trains
#   bf16-autocast  fp32 master weights and optimizer state, bf16 matmuls (torch.autocast; under FSDP2
#                  a MixedPrecisionPolicy with bf16 compute and fp32 gradient reduction): what most
#                  users run on GPUs
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "bf16-autocast": torch.float32}
AUTOCAST = {"bf16-autocast": torch.bfloat16}
METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "curves.png"


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN/inf; the run stopped without saving the bad state."""


@dataclass
class PretrainConfig:
    """Everything one pre-training run needs. ``None`` fields take the preset's paper recipe.

    ``batch_size`` is the micro-batch of one process; the global batch of one optimizer step is
    ``batch_size * grad_accum * world_size`` sequences of ``seq_len`` tokens.
    """

    preset: str = "llama-small"
    model_config: str | None = None   # a Hugging Face config.json (or folder) instead of the preset
    dense: bool = False               # train the dense model (baseline) instead of CoLA
    rank: int | float | dict | None = None  # CoLA rank: int, fraction of d_model, or {role: rank}; None: preset's
    recompute: bool = False           # CoLA-M: keep only the rank-r activations for backward
    compile: bool = False             # torch.compile(model, backend="colafx")
    dtype: str = "fp32"               # "fp32", "bf16" (pure bf16 weights, as the paper's code) or "bf16-autocast"
    device: str = "auto"              # "auto" (CUDA when present), "cpu", "cuda", "cuda:N"
    data: Any = None                  # paths / datasets object; None: the embedded Python-docs corpus
    val_data: Any = None              # held-out data; None: hold out val_fraction of the documents
    val_fraction: float = 0.05
    val_tokens: int | None = None     # cap on validation tokens (a fixed budget, as the paper evaluates)
    tokenizer: str | None = None      # HF folder / tokenizer.json / .gguf; None: train a byte-level BPE
    seq_len: int = 128
    batch_size: int = 8
    grad_accum: int = 1
    steps: int | None = None
    lr: float | None = None
    warmup: int | None = None
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    clip: float = 0.5
    eval_every: int = 100
    eval_blocks: int | None = None    # cap on validation blocks per evaluation; None: all
    save_every: int | None = None     # None: at every evaluation
    keep: int = 2                     # checkpoints kept
    out: str = "runs/pretrain"
    resume: bool = False
    seed: int = 0
    fsdp: bool = False
    progress: bool = True

    def __post_init__(self):
        from colafx import presets

        if self.model_config is None:
            presets.get(self.preset)  # raises ValueError naming the valid presets
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        for name in ("seq_len", "batch_size", "grad_accum", "eval_every", "keep"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.rank is not None and self.dense:
            raise ValueError("--rank and --dense exclude each other")
        if self.recompute and self.dense:
            raise ValueError("--recompute is CoLA-M and needs a CoLA model (drop --dense)")
        resolve_device(self.device)  # a clear error for --device cuda without CUDA, before any work


@dataclass
class PretrainResult:
    """What :func:`train` returns. ``history`` holds every row written to ``metrics.jsonl``."""

    val_loss: float
    val_ppl: float
    steps: int
    tokens: int
    train_seconds: float
    tokens_per_s: float
    flops_per_s: float
    flops_per_token: float   # training FLOPs per token (3x the plan's forward FLOPs)
    params: int
    out: Path
    history: list[dict] = field(default_factory=list)
    model: nn.Module | None = None


def lr_lambda(step: int, warmup: int, steps: int, min_ratio: float) -> float:
    """LR multiplier at ``step``: linear warmup to 1, then cosine decay to ``min_ratio`` at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def next_token_loss(model: nn.Module, blocks: torch.Tensor, reduction: str = "mean",
                    autocast: torch.dtype | None = None) -> torch.Tensor:
    """Cross-entropy of predicting ``blocks[:, 1:]`` from ``blocks[:, :-1]`` (fp32 logits); the
    forward runs under ``torch.autocast(autocast)`` when given. ``blocks`` move to the model's device."""
    blocks = to_device(blocks, model_device(model))
    with torch.autocast(blocks.device.type, dtype=autocast, enabled=autocast is not None):
        logits = model(input_ids=blocks[:, :-1], use_cache=False).logits
    return F.cross_entropy(logits.float().flatten(0, 1), blocks[:, 1:].flatten(), reduction=reduction)



@torch.no_grad()
def evaluate(model: nn.Module, blocks: torch.Tensor, batch_size: int, rank: int = 0, world: int = 1,
             autocast: torch.dtype | None = None) -> float:
    """Mean next-token loss over every target token of ``blocks`` (rank ``r`` takes blocks r::world,
    sums are all-reduced), i.e. summed token losses / token count, not a mean of batch means."""
    was_training = model.training
    model.eval()
    mine = blocks[rank::world]
    total = torch.zeros(2, dtype=torch.float64)
    for i in range(0, len(mine), batch_size):
        batch = mine[i:i + batch_size]
        total[0] += next_token_loss(model, batch, "sum", autocast).double().item()
        total[1] += batch[:, 1:].numel()
    total = dist_utils.all_reduce_sum(total)
    model.train(was_training)
    return (total[0] / total[1]).item()


def prepare_data(config: PretrainConfig, tokenizer_dir: Path | None):
    """Tokenizer and ``(train_blocks, val_blocks)`` for ``config`` (a BPE is trained when no
    tokenizer is given, and saved to ``tokenizer_dir``; an existing one there is reused on resume).

    Raises:
        FileNotFoundError / ValueError: see :func:`colafx.runtime.data.read_texts`; too little data.
    """
    from colafx import presets

    if config.data is not None and D.is_prepared(config.data):
        return _prepared_data(config)
    docs = D.embedded_corpus() if config.data is None else D.read_texts(config.data)
    if config.val_data is not None:
        train_docs, val_docs = docs, D.read_texts(config.val_data)
    else:
        train_docs, val_docs = D.split_documents(docs, config.val_fraction, config.seed)
    if config.tokenizer:
        tokenizer = D.load_any_tokenizer(config.tokenizer)
    elif tokenizer_dir is not None and config.resume and (tokenizer_dir / "tokenizer.json").exists():
        tokenizer = D.load_any_tokenizer(tokenizer_dir)
    else:
        vocab = presets.get(config.preset).vocab_size if config.model_config is None else 32000
        if config.progress and dist_utils.setup().is_main:
            print(f"training a byte-level BPE tokenizer ({vocab:,} tokens) on {len(train_docs):,} documents "
                  "(pass --tokenizer to reuse one)", flush=True)
        tokenizer = D.train_tokenizer(train_docs, vocab)
    eos = tokenizer.eos_token_id
    train = D.pack(D.encode(train_docs, tokenizer), config.seq_len, eos)
    val = D.pack(D.encode(val_docs, tokenizer), config.seq_len, eos)
    if config.val_tokens:
        val = val[: max(1, config.val_tokens // (config.seq_len + 1))]
    if config.eval_blocks is not None:
        val = val[: config.eval_blocks]
    return tokenizer, train, val


def _prepared_data(config: PretrainConfig):
    """A ``colafx prepare`` directory: memory-mapped training windows, validation from ``val.bin`` (or
    ``--val-data``) capped at ``--val-tokens``, and the tokenizer recorded in its index."""
    from colafx.runtime.prepare import read_index, tokenizer_fingerprint

    folder = Path(config.data[0] if isinstance(config.data, (list, tuple)) else config.data)
    index = read_index(folder)
    tokenizer = D.load_any_tokenizer(config.tokenizer or index["tokenizer"]["path"])
    if tokenizer_fingerprint(tokenizer) != index["tokenizer"]["fingerprint"]:
        raise ValueError(f"--tokenizer {config.tokenizer} differs from the one {folder} was prepared with "
                         f"({index['tokenizer']['path']}): the token ids would not match")
    train = D.PreparedCorpus(folder, config.seq_len, config.seed)
    if config.val_data is not None:
        docs = D.read_texts(config.val_data)
        val = D.pack(D.encode(docs, tokenizer), config.seq_len, tokenizer.eos_token_id)
        val = val[: max(1, config.val_tokens // (config.seq_len + 1))] if config.val_tokens else val
    else:
        val = D.prepared_val_blocks(folder, config.seq_len, config.val_tokens)
    if config.eval_blocks is not None:
        val = val[: config.eval_blocks]
    return tokenizer, train, val


def build_model(config: PretrainConfig, vocab_size: int):
    """The dense model of ``config`` (seeded) and its ``colafx.plan`` at ``config.seq_len``.

    Raises:
        ValueError: a model config whose vocabulary is smaller than the tokenizer's, or a bad rank.
    """
    import colafx
    from colafx import presets

    torch.manual_seed(config.seed)
    if config.model_config is None:
        p = presets.get(config.preset)
        model = presets.build(config.preset, seed=config.seed, vocab_size=vocab_size,
                              max_position_embeddings=max(p.max_position_embeddings, config.seq_len))
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        hf_config = AutoConfig.from_pretrained(config.model_config)
        if hf_config.vocab_size < vocab_size:
            raise ValueError(f"model config vocabulary {hf_config.vocab_size} is smaller than the tokenizer's "
                             f"{vocab_size}")
        model = AutoModelForCausalLM.from_config(hf_config)
    rank = config.rank if config.rank is not None else (
        presets.get(config.preset).rank if config.model_config is None else 0.25)
    the_plan = colafx.plan(model, rank=rank, seq_len=config.seq_len)
    return model, the_plan


def _apply_transforms(model: nn.Module, config: PretrainConfig, the_plan) -> nn.Module:
    from colafx.transform.colaify import apply_plan

    if not config.dense:
        apply_plan(model, the_plan, torch.Generator().manual_seed(config.seed))
    if config.recompute:
        try:
            from colafx.transform.recompute import enable_recompute
        except ImportError as err:
            raise ImportError(f"--recompute needs colafx.transform.recompute, which is not available in this "
                              f"installation ({err})") from None
        enable_recompute(model)
    return model.to(DTYPES[config.dtype])


def _compile(model: nn.Module) -> nn.Module:
    try:
        import colafx.transform.backend  # noqa: F401  (registers the "colafx" backend)
    except ImportError as err:
        raise ImportError(f"--compile needs the torch.compile backend colafx.transform.backend, which is not "
                          f"available in this installation ({err})") from None
    return torch.compile(model, backend="colafx")


def _fingerprint(config: PretrainConfig, model: nn.Module, train_blocks: torch.Tensor, world: int) -> dict:
    keys = ("preset", "model_config", "dense", "rank", "dtype", "seq_len", "steps", "lr", "warmup",
            "min_lr_ratio", "weight_decay", "clip", "seed", "recompute", "fsdp")
    fp = {k: getattr(config, k) for k in keys}
    fp["global_batch"] = config.batch_size * config.grad_accum * world
    fp["params"] = sum(p.numel() for p in model.parameters())
    fp["train_data_sha256"] = (train_blocks.fingerprint() if isinstance(train_blocks, D.PreparedCorpus)
                               else hashlib.sha256(train_blocks.numpy().tobytes()).hexdigest())
    return fp


def _resolve_recipe(config: PretrainConfig) -> PretrainConfig:
    from colafx import presets

    p = presets.get(config.preset if config.model_config is None else "llama-60m")
    steps = config.steps or p.steps
    return dataclasses.replace(
        config, steps=steps, lr=config.lr or p.lr,
        warmup=min(config.warmup if config.warmup is not None else p.warmup, steps))


def train(config: PretrainConfig) -> PretrainResult:
    """Pre-train the model described by ``config``; write checkpoints, ``metrics.jsonl``, the curves
    PNG and the final model (``<out>/model``: ``colafx.load`` + tokenizer) to ``config.out``.

    Raises:
        ValueError: bad settings, data or checkpoint (``CheckpointError``); an ``out`` folder that
            already holds a run while ``resume`` is false (nothing is overwritten).
        FileNotFoundError: missing data / tokenizer files.
        ImportError: ``recompute`` / ``compile`` requested but their modules are not available.
        TrainingDiverged: NaN/inf loss; the last good checkpoint is kept and named in the message.
    """
    config = _resolve_recipe(config)
    device = resolve_device(config.device)
    env = dist_utils.setup(device)
    autocast = AUTOCAST.get(config.dtype) if not (config.fsdp and env.world > 1) else None
    out = Path(config.out)
    ckpt_dir = out / "checkpoints"
    if env.is_main and not config.resume and (ckpt.latest(ckpt_dir) or (out / METRICS_NAME).exists()):
        raise ValueError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    tokenizer, train_blocks, val_blocks = prepare_data(config, out / "model" / "tokenizer")
    model, the_plan = build_model(config, len(tokenizer))
    model = _apply_transforms(model, config, the_plan)
    fwd_flops = the_plan.flops_before if config.dense else the_plan.flops_after
    fingerprint = _fingerprint(config, model, train_blocks, env.world)
    start, history, state = 0, [], None
    resume_from = ckpt.latest(ckpt_dir) if config.resume else None
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, model, fingerprint, may_differ=("steps", "warmup"))
        start = state["step"]
        before = state["fingerprint"].get("steps")
        if start > config.steps:
            raise ValueError(f"{resume_from} is at step {start}, past --steps {config.steps}; pass a larger --steps")
        if before != config.steps and env.is_main:
            print(f"resuming at step {start}: the run is {'extended' if config.steps > before else 'shortened'} "
                  f"from {before} to {config.steps} steps; the LR schedule (warmup {config.warmup}, cosine "
                  f"decay) is recomputed for {config.steps}", flush=True)
        history = [r for r in _read_metrics(out / METRICS_NAME) if r["step"] <= start]
    model, plain = dist_utils.wrap(model, env, config.fsdp, device, AUTOCAST.get(config.dtype))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, config.warmup, config.steps, config.min_lr_ratio))
    if state is not None:
        if state["sharded"] is not None:
            ckpt.load_sharded_state(state["sharded"], model, optimizer)
        else:
            dist_utils.load_optimizer_state(model, optimizer, state["optimizer"], config.fsdp)
        scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
    runner = _compile(model) if config.compile else model

    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(out / "model" / "tokenizer")
        history += [{"step": start, "split": "env", **environment(device, config.dtype), "world": env.world}]
        _write_metrics(out / METRICS_NAME, history)
    stream = train_blocks if isinstance(train_blocks, D.PreparedCorpus) else D.BlockStream(train_blocks, config.seed)
    global_batch = config.batch_size * config.grad_accum * env.world
    tokens_per_step = global_batch * config.seq_len
    save_every = config.save_every or config.eval_every
    train_time, val_loss = 0.0, float("nan")
    bar = _progress(config, env, start)
    model.train()
    for step in range(start, config.steps):
        t0 = time.perf_counter()
        loss = _train_step(runner, optimizer, stream.batch(step, global_batch, env.rank, env.world), config, step,
                           autocast)
        scheduler.step()
        synchronize(device)  # _train_step's .item() already waits; this keeps the timing honest if that changes
        train_time += time.perf_counter() - t0
        done = step + 1
        tok_s = (done - start) * tokens_per_step / train_time
        row = {"step": done, "split": "train", "loss": loss, "ppl": math.exp(min(loss, 50)),
               "lr": scheduler.get_last_lr()[0], "tokens": done * tokens_per_step, "tokens_per_s": tok_s,
               "flops_per_s": 3 * fwd_flops * tok_s}
        rows = [row]
        if done % config.eval_every == 0 or done == config.steps:
            val_loss = evaluate(runner, val_blocks, config.batch_size, env.rank, env.world, autocast)
            rows.append({"step": done, "split": "val", "loss": val_loss, "ppl": math.exp(min(val_loss, 50)),
                         "tokens": done * tokens_per_step})
        if env.is_main:
            history += rows
            _append_metrics(out / METRICS_NAME, rows)
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.3f}", ppl=f"{row['ppl']:.1f}", tok_s=f"{tok_s:.0f}")
                bar.update(1)
        if done % save_every == 0 or done == config.steps:
            _save(ckpt_dir, done, model, plain, optimizer, scheduler, fingerprint, config, env)
    if bar is not None:
        bar.close()
    if start >= config.steps or math.isnan(val_loss):
        val_loss = evaluate(runner, val_blocks, config.batch_size, env.rank, env.world, autocast)
    final = dist_utils.full_model(model, plain, env, config.fsdp)
    if env.is_main:
        import colafx

        colafx.save(final, out / "model", metadata={"pretrain": _fingerprint_safe(config)})
        _plot(history, out / PLOT_NAME, config)
        print(f"final validation loss {val_loss:.4f}, perplexity {math.exp(val_loss):.2f} "
              f"({(config.steps - start) * tokens_per_step:,} tokens, {train_time:.0f} s) -> {out / 'model'}")
    dist_utils.barrier()
    tok_s = (config.steps - start) * tokens_per_step / train_time if train_time else 0.0
    return PretrainResult(val_loss=val_loss, val_ppl=math.exp(val_loss), steps=config.steps,
                          tokens=config.steps * tokens_per_step, train_seconds=train_time, tokens_per_s=tok_s,
                          flops_per_s=3 * fwd_flops * tok_s, flops_per_token=3 * fwd_flops,
                          params=sum(p.numel() for p in final.parameters()), out=out, history=history,
                          model=final)


def _train_step(model, optimizer, blocks: torch.Tensor, config: PretrainConfig, step: int,
                autocast: torch.dtype | None = None) -> float:
    """One optimizer step over ``grad_accum`` micro-batches; returns the loss averaged over ranks."""
    blocks = to_device(blocks, model_device(model))  # one pinned, non-blocking copy per step
    micro = blocks.split(config.batch_size)
    total = torch.zeros(1, dtype=torch.float64, device=blocks.device)
    for i, mb in enumerate(micro):
        last = i == len(micro) - 1
        with contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
            loss = next_token_loss(model, mb, autocast=autocast)
            if not torch.isfinite(loss):
                _diverged(f"loss is {loss.item()} at step {step + 1}", config)
            (loss / len(micro)).backward()
        total += loss.detach().double() / len(micro)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    if not torch.isfinite(norm):
        _diverged(f"gradient norm is {norm.item()} at step {step + 1}", config)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return (dist_utils.all_reduce_sum(total) / dist_utils.world_size()).item()


def _diverged(what: str, config: PretrainConfig):
    last = ckpt.latest(Path(config.out) / "checkpoints")
    where = f"the last good checkpoint is {last} (continue with --resume, e.g. with a lower --lr)" if last \
        else "no checkpoint was written yet"
    raise TrainingDiverged(f"training diverged: {what}; stopped without saving, {where}")


def _save(root, step, model, plain, optimizer, scheduler, fingerprint, config, env):
    """Checkpoint ``step``: sharded (DCP, every rank writes its shard) under multi-process FSDP2, else
    the full state written by rank 0 (DDP ranks hold identical copies)."""
    if config.fsdp and env.world > 1:
        from colafx.transform.io import model_record

        ckpt.save_sharded_checkpoint(root, step, model, optimizer, scheduler.state_dict(), fingerprint,
                                     model_record(plain) if env.is_main else None, keep=config.keep)
        return
    if env.is_main:
        ckpt.save_checkpoint(root, step, plain, optimizer.state_dict(), scheduler.state_dict(), fingerprint,
                             keep=config.keep)
    dist_utils.barrier()


def _fingerprint_safe(config: PretrainConfig) -> dict:
    d = dataclasses.asdict(config)
    d["data"] = None if config.data is None else str(config.data)
    d["val_data"] = None if config.val_data is None else str(config.val_data)
    return ckpt.json_roundtrip(d)


def _read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_metrics(path: Path, rows: list[dict]) -> None:
    from colafx.files import atomic_write_bytes

    def write(tmp):
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    atomic_write_bytes(path, write)


def _append_metrics(path: Path, rows: list[dict]) -> None:
    with open(path, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def _progress(config: PretrainConfig, env, start: int):
    if not (config.progress and env.is_main):
        return None
    from tqdm.auto import tqdm

    kind = "dense" if config.dense else "CoLA"
    return tqdm(total=config.steps, initial=start, desc=f"pretrain {config.preset} {kind}", unit="step",
                dynamic_ncols=True)


def _plot(history: list[dict], path: Path, config: PretrainConfig) -> None:
    from colafx.runtime.plot import plot_curves

    series = {split: [(r["step"], r["loss"]) for r in history if r["split"] == split] for split in ("train", "val")}
    kind = "dense" if config.dense else "CoLA"
    plot_curves(series, path, xlabel="step", ylabel="loss", title=f"{config.preset} {kind} pre-training")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``colafx pretrain`` (defaults: the preset's paper recipe)."""
    from colafx import presets
    from colafx.transform.colaify import RANK_HELP

    d = PretrainConfig()
    parser.add_argument("--preset", choices=presets.names(), default=d.preset, help="model size")
    parser.add_argument("--model-config", default=None,
                        help="a Hugging Face config.json (or folder) to build instead of the preset")
    parser.add_argument("--dense", action="store_true", help="train the dense baseline instead of CoLA")
    parser.add_argument("--rank", action="append", default=None, metavar="[ROLE=]R",
                        help=RANK_HELP + " (default: the preset's paper rank)")
    parser.add_argument("--recompute", action="store_true", help="CoLA-M: recompute all but the rank-r activations")
    parser.add_argument("--compile", action="store_true", help='torch.compile(model, backend="colafx")')
    parser.add_argument("--dtype", choices=list(DTYPES), default=d.dtype,
                        help="fp32; bf16: pure bf16 weights and optimizer state (the CoLA paper's recipe); "
                             "bf16-autocast: fp32 master weights, bf16 matmuls (FSDP2: MixedPrecisionPolicy)")
    parser.add_argument("--device", default=d.device, help=DEVICE_HELP)
    parser.add_argument("--data", nargs="+", default=None,
                        help="a directory written by colafx prepare (memory-mapped shards), or "
                             ".txt/.md/.jsonl/.json.gz/.parquet files, folders, globs or hf: sources (see "
                             "colafx prepare --help; read into memory; "
                             "default: the embedded corpus of Python's own documentation)")
    parser.add_argument("--val-data", nargs="+", default=None,
                        help="validation files (default: hold out --val-fraction of the documents, or a "
                             "prepared directory's val.bin)")
    parser.add_argument("--val-tokens", type=int, default=None,
                        help="evaluate on at most this many held-out tokens (default: all)")
    parser.add_argument("--val-fraction", type=float, default=d.val_fraction, help="held-out share of the data")
    parser.add_argument("--tokenizer", default=None,
                        help="HF tokenizer folder, tokenizer.json, .gguf or 'smollm2' (default: train a byte-level "
                             "BPE with the preset's vocabulary on the training split, saved with the run)")
    parser.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per sequence")
    parser.add_argument("--batch-size", type=int, default=d.batch_size,
                        help="sequences per micro-batch per process")
    parser.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the preset's)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the preset's)")
    parser.add_argument("--warmup", type=int, default=None, help="linear warmup steps (default: the preset's)")
    parser.add_argument("--eval-every", type=int, default=d.eval_every, help="validate every N steps (and at the end)")
    parser.add_argument("--eval-blocks", type=int, default=None, help="cap on validation sequences (default: all)")
    parser.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps (default: --eval-every)")
    parser.add_argument("--keep", type=int, default=d.keep, help="checkpoints to keep")
    parser.add_argument("--out", default=d.out, help="run folder: checkpoints, metrics.jsonl, curves.png, model/")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of init, data order and split")
    parser.add_argument("--fsdp", action="store_true", help="under torchrun: shard with FSDP2 instead of DDP")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar (default: shown)")


def run_cli(args: argparse.Namespace) -> int:
    """Run ``colafx pretrain``; returns 0, or 1 with a message for missing features / divergence."""
    fields = {f.name for f in dataclasses.fields(PretrainConfig)}
    kwargs = {k: v for k, v in vars(args).items() if k in fields}
    if kwargs.get("rank"):
        from colafx.transform.colaify import parse_rank

        kwargs["rank"] = parse_rank(kwargs["rank"])
    config = PretrainConfig(**kwargs, progress=not args.no_progress)
    try:
        train(config)
    except (ImportError, TrainingDiverged) as err:
        print(f"colafx pretrain: error: {err}", flush=True)
        return 1
    return 0
