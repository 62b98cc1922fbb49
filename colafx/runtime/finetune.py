"""``colafx finetune``: QuZO (integer weights, forward passes only), MeZO (float) or AdamW fine-tuning.

Writes ``metrics.jsonl`` (one row per logged step), ``curve.png`` (dev metric vs step) and a
resumable ``checkpoint/`` (colafx checkpoint + optimizer state) to ``--out``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from colafx.runtime import tasks
from colafx.runtime.device import DEVICE_HELP, environment, resolve_device

METHODS = ("quzo", "mezo", "adamw")
TRAINABLE = ("auto", "all", "cola", "lora")
CHECKPOINT = "checkpoint"
DEV_SEED = 1  # shuffles the dev file before the first n_dev examples are taken


@dataclass
class FinetuneConfig:
    """Everything one fine-tuning run needs (the CLI flags map 1:1 onto these fields)."""

    model: Optional[str] = None          # "smollm2", a HF folder, a .gguf file or a colafx checkpoint
    preset: Optional[str] = None         # or a random-init preset (byte tokenizer)
    task: str = "sst2"                   # "sst2", "classify" (train/dev files + template) or "text"
    data_dir: Optional[str] = None       # sst2: folder holding train.tsv / dev.tsv (or SST-2/ in it)
    train_file: Optional[str] = None
    dev_file: Optional[str] = None
    template: Optional[str] = None       # "classify": e.g. "{sentence} It was"
    label_words: Optional[list] = None   # "classify": e.g. [" terrible", " great"]
    label_field: str = "label"           # "classify": the column holding the label
    label_names: Optional[list] = None   # "classify": label strings in label-word order (else int labels)
    objective: str = "vocab"             # sst2/classify loss: "vocab" (label-word LM loss) or "candidates"
    method: str = "quzo"
    bits: int = 8
    act_bits: int = 8
    group_size: Optional[int] = None
    quantize_base: bool = False          # adamw / mezo + trainable "lora": quantize the frozen base (bits, act_bits)
    gptq: Optional[str] = None           # quzo / quantize_base: GPTQ weights calibrated on this text (file, folder, hf:)
    calibration_tokens: int = 8192       # gptq: tokens of that text, in windows of 256
    trainable: str = "auto"              # "all", "cola", "lora", or "auto": "lora" for QuZO int4, else "all"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    steps: int = 100
    lr: float = 1e-6
    eps: float = 1e-3
    weight_decay: float = 0.0
    n_queries: int = 1
    same_rounding: bool = False
    schedule: str = "constant"
    warmup: int = 0                      # ZO: linear LR warmup steps
    batch_size: int = 16
    k_shot: int = 16                     # training examples per class (0: all)
    n_dev: int = 200
    seq_len: int = 128                   # "text": block length
    eval_every: int = 50
    seed: int = 0
    out: str = "runs/finetune"
    resume: bool = False
    progress: bool = True
    device: str = "auto"                 # "auto" (CUDA when present), "cpu", "cuda", "cuda:N"

    def validate(self) -> None:
        """Raise ValueError naming the first bad field, or FileNotFoundError for a missing data file
        (checked here, before the model loads)."""
        if (self.model is None) == (self.preset is None):
            raise ValueError("give exactly one of model or preset")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS}")
        if self.task not in ("sst2", "classify", "text"):
            raise ValueError(f"unknown task {self.task!r}; choose sst2, classify or text")
        if self.bits not in (8, 4):
            raise ValueError(f"bits must be 8 or 4, got {self.bits}")
        if self.objective not in tasks.OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; choose one of {tasks.OBJECTIVES}")
        if self.trainable not in TRAINABLE:
            raise ValueError(f"unknown trainable set {self.trainable!r}; choose one of {TRAINABLE}")
        if self.quantize_base and (self.method == "quzo" or self.resolved_trainable() != "lora"):
            raise ValueError("quantize_base is for method adamw / mezo with trainable='lora' "
                             "(quzo always quantizes its base)")
        if self.gptq is not None and not (self.method == "quzo" or self.quantize_base):
            raise ValueError("gptq picks the integer weights of a quantized base: use it with method 'quzo' "
                             "or quantize_base")
        if self.gptq is not None and self.calibration_tokens <= 0:
            raise ValueError(f"calibration_tokens must be positive, got {self.calibration_tokens}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        for name in ("steps", "batch_size", "eval_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.task == "classify" and not (self.template and self.label_words and self.train_file):
            raise ValueError("task 'classify' needs train_file, template and label_words")
        if self.label_names and len(self.label_names) != len(self.label_words or ()):
            raise ValueError(f"label_names {self.label_names} must match label_words {self.label_words} one to one")
        resolve_device(self.device)  # no CUDA for --device cuda: one clear line, before any loading
        if self.task == "text" and not self.train_file:
            raise ValueError("task 'text' needs train_file (a text file to train on)")
        if self.gptq is not None and not str(self.gptq).startswith("hf:") and not Path(self.gptq).exists():
            raise FileNotFoundError(f"gptq calibration text {self.gptq} does not exist")
        for path in _data_files(self):  # before the model loads (SmolLM2 takes ~20-90 s)
            if path is not None and not Path(path).is_file():
                hint = " (--data-dir: a folder holding SST-2/train.tsv and dev.tsv)" if self.task == "sst2" else ""
                raise FileNotFoundError(f"data file {path} does not exist{hint}")


    def resolved_trainable(self) -> str:
        """``trainable`` with "auto" resolved: LoRA adapters for QuZO at 4 bits, all projections otherwise.

        Full-parameter int4 QuZO does not learn: a stochastically rounded perturbation of a few
        grid steps (qmax 6) buries the loss difference in rounding noise (docs/quzo-int4.md).
        """
        if self.trainable != "auto":
            return self.trainable
        return "lora" if self.method == "quzo" and self.bits == 4 else "all"


def _data_files(config: "FinetuneConfig") -> tuple:
    """(train file, dev file) of a config; the dev file may be ``None`` (then taken from train)."""
    if config.task == "sst2":
        folder = Path(config.data_dir or ".")
        if (folder / "SST-2").is_dir():
            folder = folder / "SST-2"
        return config.train_file or folder / "train.tsv", config.dev_file or folder / "dev.tsv"
    return config.train_file, config.dev_file


def _dtype_name(model) -> str:
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return str(dtype).replace("torch.", "")


def _load(config: FinetuneConfig):
    from colafx import presets

    if config.preset:
        return presets.build(config.preset, seed=config.seed).eval(), tasks.ByteTokenizer()
    from colafx.runtime.models import load_model, load_tokenizer

    model = load_model(config.model)
    folder = Path(config.model)
    if folder.is_dir() and not (folder / "config.json").exists():  # a colafx checkpoint
        from colafx.transform.io import read_record

        saved = read_record(folder).get("metadata", {}).get("config", {})
        if saved.get("preset") and not (folder / "tokenizer").is_dir():
            return model, tasks.ByteTokenizer()  # fine-tuned from a preset: byte tokens
    return model, load_tokenizer(config.model)


def _prepare(model, config: FinetuneConfig, tokenizer, calibrate: bool = True):
    """Quantize (QuZO; GPTQ calibrated with ``tokenizer``'s ids of ``config.gptq`` when ``calibrate``;
    a resumed run loads its codes from the checkpoint instead), add LoRA adapters, pick the
    trainable tensors; returns the optimizer."""
    from colafx.runtime.zo import QuZO, zo_targets
    from colafx.transform.quantize import QuantConfig, quantize_, quantized_modules

    done = quantized_modules(model)
    if done and config.method != "quzo" and config.trainable != "lora":
        raise ValueError(f"the model is already quantized: method {config.method!r} cannot train its integer "
                         "weights (use method='quzo', or trainable='lora' to train adapters on it)")
    if done and config.gptq is not None:
        raise ValueError("gptq: the model is already quantized; start from the float model")
    if done and {m.bits for m in done.values()} != {config.bits}:
        raise ValueError(f"the model is quantized to {sorted({m.bits for m in done.values()})} bits, "
                         f"not bits={config.bits}")
    if (config.method == "quzo" or config.quantize_base) and not done:
        # Head-room (qmax 119 / 6) only where QuZO perturbs the integer weights; a frozen LoRA base keeps
        # the full grid (127 / 7: a 17% finer int4 step).
        headroom = config.method == "quzo" and config.trainable != "lora"
        calibration = None
        if config.gptq is not None and calibrate:
            from colafx.runtime.data import calibration_ids

            device = next(model.parameters()).device
            calibration = calibration_ids(config.gptq, tokenizer, config.calibration_tokens).to(device)
        quantize_(model, QuantConfig(config.bits, config.act_bits, config.group_size, zo_headroom=headroom,
                                     algorithm="rtn" if calibration is None else "gptq"),
                  calibration=calibration)
    if config.trainable == "lora":
        from colafx.runtime.lora import LoRALinear, add_lora_

        if not any(isinstance(m, LoRALinear) for m in model.modules()):  # a LoRA checkpoint keeps its adapters
            add_lora_(model, config.lora_rank, config.lora_alpha, config.seed)
    targets = zo_targets(model, config.trainable)
    if config.method == "adamw":
        for p in model.parameters():
            p.requires_grad_(False)
        for p in targets:
            p.requires_grad_(True)
        return torch.optim.AdamW(targets, lr=config.lr, weight_decay=config.weight_decay)
    for p in model.parameters():
        p.requires_grad_(False)
    return QuZO(targets, lr=config.lr, eps=config.eps, weight_decay=config.weight_decay, method=config.method,
                n_queries=config.n_queries, same_rounding=config.same_rounding, seed=config.seed,
                schedule=config.schedule, total_steps=config.steps, warmup=config.warmup)


def _data(config: FinetuneConfig, tokenizer):
    train_file, dev_file = _data_files(config)
    dev_file = dev_file or train_file
    if config.task == "text":
        train = tasks.read_text_blocks(train_file, tokenizer, config.seq_len)
        dev = tasks.read_text_blocks(dev_file, tokenizer, config.seq_len)[: config.n_dev]
        return None, train, dev
    if config.task == "sst2":
        task = tasks.SST2
    else:
        task = tasks.PromptTask(config.template, tuple(config.label_words), config.label_field,
                                tuple(config.label_names or ()))
    train = tasks.sample_per_class(tasks.read_examples(train_file, task), config.k_shot, config.seed)
    # The dev subset does not depend on the training seed: runs with different seeds score the same examples.
    dev = tasks.sample_per_class(tasks.read_examples(dev_file, task), 0, DEV_SEED)[: config.n_dev]
    return task, train, dev


def _batch(train, config: FinetuneConfig, step: int):
    rng = random.Random(config.seed * 1_000_003 + step)
    idx = [rng.randrange(len(train)) for _ in range(config.batch_size)]
    return train[torch.tensor(idx)] if isinstance(train, torch.Tensor) else [train[i] for i in idx]


def _loss(model, tokenizer, task, batch, objective: str) -> torch.Tensor:
    if task is None:
        return tasks.text_loss(model, batch)
    return tasks.label_loss(model, tokenizer, task, batch, objective)


@torch.no_grad()
def _evaluate(model, tokenizer, task, dev) -> dict:
    if task is None:
        model.eval()
        losses = [float(tasks.text_loss(model, dev[i: i + 8])) for i in range(0, len(dev), 8)]
        return {"dev_loss": sum(losses) / len(losses)}
    return {"dev_acc": tasks.accuracy(model, tokenizer, task, dev)}


def plot_curve(rows: list[dict], path: Path, title: str) -> None:
    """Dev metric against step as a PNG (atomic write)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from colafx.files import atomic_write_bytes

    key = "dev_acc" if any("dev_acc" in r for r in rows) else "dev_loss"
    points = [(r["step"], r[key]) for r in rows if key in r]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(*zip(*points), marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title(title)
    fig.tight_layout()
    atomic_write_bytes(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def _save_checkpoint(model, optimizer, out: Path, step: int, config: FinetuneConfig, tokenizer=None) -> None:
    import colafx
    from colafx.files import atomic_write_bytes

    folder = out / CHECKPOINT
    meta = {"step": step, "config": dataclasses.asdict(config)}
    if isinstance(optimizer, torch.optim.Optimizer):
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / "optimizer.pt", lambda tmp: torch.save(optimizer.state_dict(), tmp))
    else:
        meta["zo_state"] = optimizer.state_dict()
    colafx.save(model, folder, metadata=meta)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained") and not (folder / "tokenizer").is_dir():
        tokenizer.save_pretrained(str(folder / "tokenizer"))  # so --model OUT/checkpoint works


def _resume(model, optimizer, out: Path) -> int:
    """Load the checkpoint's weights and optimizer state into the prepared model; return its step."""
    from colafx.transform.io import load, read_record

    import colafx.runtime.lora  # noqa: F401  (registers the "lora" record)

    folder = out / CHECKPOINT
    meta = read_record(folder).get("metadata", {})
    loaded = load(folder)
    model.load_state_dict(loaded.state_dict())
    if isinstance(optimizer, torch.optim.Optimizer):
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt"))
    else:
        optimizer.load_state_dict(meta["zo_state"])
    return int(meta["step"])


def finetune(config: FinetuneConfig, loaded: Optional[tuple] = None) -> dict:
    """Run fine-tuning as ``config`` says; returns ``{"history": rows, "final": last eval row,
    "model": the trained model, "optimizer": its optimizer}``.

    ``loaded``: ``(model, tokenizer)`` already loaded from ``config.model`` (changed in place), so a
    caller running several configs loads once.

    Raises:
        ValueError: bad configuration, wrong data files or labels.
        FileNotFoundError: missing model or data file.
        FloatingPointError: the loss became NaN / infinite (lower lr or eps).
    """
    from tqdm.auto import tqdm

    config.validate()
    config = dataclasses.replace(config, trainable=config.resolved_trainable())  # the checkpoint records it
    out = Path(config.out)
    model, tokenizer = loaded or _load(config)
    device = resolve_device(config.device)
    model.to(device)  # before quantizing / LoRA: their tensors are made where the weights are
    resuming = config.resume and (out / CHECKPOINT).is_dir()
    optimizer = _prepare(model, config, tokenizer, calibrate=not resuming)
    task, train, dev = _data(config, tokenizer)
    out.mkdir(parents=True, exist_ok=True)  # only now: a run that fails to start leaves no empty folder
    start = _resume(model, optimizer, out) if resuming else 0
    metrics_path = out / "metrics.jsonl"
    history = [json.loads(line) for line in metrics_path.read_text().splitlines()] if start else []
    history = [r for r in history if r["step"] <= start]

    def log(row: dict) -> None:
        history.append(row)
        from colafx.files import atomic_write_bytes

        text = "".join(json.dumps(r) + "\n" for r in history)
        atomic_write_bytes(metrics_path, lambda tmp: Path(tmp).write_text(text))

    if start == 0:
        log({"step": 0, **_evaluate(model, tokenizer, task, dev), **environment(device, _dtype_name(model))})
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, disable=not config.progress,
               desc=f"{config.method}{'' if config.method != 'quzo' else f'-int{config.bits}'}")
    t0 = time.perf_counter()
    for step in bar:
        batch = _batch(train, config, step)
        if isinstance(optimizer, torch.optim.Optimizer):
            model.train()
            loss = _loss(model, tokenizer, task, batch, config.objective)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"step {step}: loss is {float(loss)}; lower the LR")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss = float(loss.detach())
        else:
            model.eval()
            loss = optimizer.step(lambda: _loss(model, tokenizer, task, batch, config.objective))
        bar.set_postfix(loss=f"{loss:.4f}")
        row = {"step": step + 1, "loss": loss, "time_s": time.perf_counter() - t0}
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            row.update(_evaluate(model, tokenizer, task, dev))
            bar.write(f"step {step + 1}: " + ", ".join(f"{k}={v:.4f}" for k, v in row.items() if k != "step"))
            _save_checkpoint(model, optimizer, out, step + 1, config, tokenizer)
        log(row)
    plot_curve(history, out / "curve.png", f"{config.model or config.preset}: {config.method}")
    final = next(r for r in reversed(history) if "dev_acc" in r or "dev_loss" in r)
    return {"history": history, "final": final, "model": model, "optimizer": optimizer}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``colafx finetune`` (one per :class:`FinetuneConfig` field)."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model to fine-tune: 'smollm2', a HF folder, a .gguf file or a colafx checkpoint")
    src.add_argument("--preset", help="a random-init preset (e.g. llama-tiny) with a byte tokenizer")
    parser.add_argument("--task", default="sst2", choices=["sst2", "classify", "text"],
                        help="sst2 prompts, any TSV/JSONL classification (--template/--label-words), or causal-LM text")
    parser.add_argument("--data-dir", help="sst2: folder with train.tsv/dev.tsv (or an SST-2/ sub-folder)")
    parser.add_argument("--train-file", help="training TSV/JSONL (classify) or .txt (text)")
    parser.add_argument("--dev-file", help="dev TSV/JSONL/.txt (default: the training file)")
    parser.add_argument("--template", help="classify: prompt template with {field} names, e.g. '{sentence} It was'")
    parser.add_argument("--label-words", nargs="+", help="classify: one word per label index, e.g. ' bad' ' good'")
    parser.add_argument("--label-field", default="label", help="classify: the TSV column / JSON key holding the label")
    parser.add_argument("--label-names", nargs="+",
                        help="classify: label strings in --label-words order, e.g. negative positive (default: int labels)")
    parser.add_argument("--objective", default="vocab", choices=list(tasks.OBJECTIVES),
                        help="sst2/classify loss: 'vocab' = cross-entropy of the gold label word over the "
                             "vocabulary (the papers'), 'candidates' = cross-entropy over the label words only")
    parser.add_argument("--method", default="quzo", choices=METHODS,
                        help="quzo: integer weights, forward only; mezo: float, forward only; adamw: backprop")
    parser.add_argument("--bits", type=int, default=8, choices=[8, 4], help="quzo (or --quantize-base): weight bits")
    parser.add_argument("--act-bits", type=int, default=8, choices=[8, 16], help="quzo (or --quantize-base): activation bits (16 = weight-only)")
    parser.add_argument("--group-size", type=int, default=None, help="quzo (or --quantize-base): weight scale group size (default per channel)")
    parser.add_argument("--quantize-base", action="store_true",
                        help="adamw / mezo with --trainable lora: quantize the frozen base to --bits / --act-bits "
                             "(adamw backpropagates through it by the straight-through estimator)")
    parser.add_argument("--gptq", metavar="TEXT", default=None,
                        help="quzo (or --quantize-base): GPTQ integer weights (each linear's output error "
                             "minimised on this text: a file, folder or hf: source) instead of round-to-nearest")
    parser.add_argument("--calibration-tokens", type=int, default=8192,
                        help="with --gptq: tokens of the text used, in windows of 256")
    parser.add_argument("--trainable", default="auto", choices=list(TRAINABLE),
                        help="train all projections, only CoLA factors, or LoRA adapters on a frozen base; auto: "
                             "LoRA for quzo --bits 4 (full-parameter int4 QuZO does not learn), all otherwise")
    parser.add_argument("--lora-rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps")
    parser.add_argument("--lr", type=float, default=1e-6, help="learning rate")
    parser.add_argument("--eps", type=float, default=1e-3, help="ZO perturbation scale")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="weight decay")
    parser.add_argument("--n-queries", type=int, default=1, help="ZO: seeds (two-point estimates) per step")
    parser.add_argument("--same-rounding", action="store_true",
                        help="quzo: reuse the perturbation's rounding in the update (the authors' released code)")
    parser.add_argument("--schedule", default="constant", choices=["constant", "linear", "cosine"], help="LR schedule")
    parser.add_argument("--warmup", type=int, default=0, help="ZO: linear LR warmup steps before the schedule")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per step")
    parser.add_argument("--k-shot", type=int, default=16, help="training examples per class (0: all)")
    parser.add_argument("--n-dev", type=int, default=200, help="dev examples to evaluate on")
    parser.add_argument("--seq-len", type=int, default=128, help="text: block length")
    parser.add_argument("--eval-every", type=int, default=50, help="evaluate and checkpoint every N steps")
    parser.add_argument("--seed", type=int, default=0, help="seed of sampling, batches and perturbations")
    parser.add_argument("--out", default="runs/finetune", help="output folder (metrics.jsonl, curve.png, checkpoint/)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint if it exists")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="hide the progress bar (default: shown)")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)


def run_cli(args: argparse.Namespace) -> int:
    """Run ``colafx finetune`` and print the dev metric before and after."""
    fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    config = FinetuneConfig(**{k: v for k, v in vars(args).items() if k in fields})
    result = finetune(config)
    first, final = result["history"][0], result["final"]
    key = "dev_acc" if "dev_acc" in final else "dev_loss"
    print(f"{key}: step 0 {first.get(key, float('nan')):.4f} -> step {final['step']} {final[key]:.4f}; "
          f"outputs in {config.out}")
    return 0
