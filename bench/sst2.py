"""SST-2 dev accuracy over seeds: zero-shot, MeZO, QuZO int8 / int4, AdamW and quantized AdamW (LoRA).

    python bench/sst2.py                        # SmolLM2-135M, CPU; prints Markdown tables
    python bench/sst2.py --quick                # smoke run: 1 seed, a few steps, tiny dev / sweep

Every variant trains LoRA adapters (rank 8, alpha 16) for the same number of steps on the same
k-shot training sets (one per seed), batches and dev examples. Variants: MeZO on the fp32 base, QuZO
on a W8A8 / W4A8 base (forward passes only), AdamW on the fp32 base and AdamW on a W8A8 / W4A8 base
(backprop through the quantized forward with the straight-through estimator: the quantized
first-order baseline QuZO is compared with). LR and ε per variant are picked by a sweep of
``--sweep-steps`` steps (default: as long as the runs; seed 0) scored on held-out training examples (the last ``HELDOUT`` rows of
train.tsv, never used for training and never the dev set). Peak memory per variant is measured as
``bench/zo_memory.py`` does (resident tensors + the profiled peak of one step).
Writes ``sst2.json`` (every seed's curve, the sweep, memory) and ``sst2.png`` (mean ± std) to ``--out``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {  # name -> FinetuneConfig fields
    "mezo-fp32": dict(method="mezo"),
    "quzo-int8": dict(method="quzo", bits=8),
    "quzo-int4": dict(method="quzo", bits=4),
    "adamw-fp32": dict(method="adamw"),
    "adamw-int8": dict(method="adamw", bits=8, quantize_base=True),
    "adamw-int4": dict(method="adamw", bits=4, quantize_base=True),
}
SWEEP = {  # (lr, eps) candidates per method family
    "zo": [(1e-3, 1e-2), (1e-3, 4e-2), (3e-3, 4e-2)],
    "adamw": [(3e-4, 0.0), (1e-3, 0.0)],
}
HELDOUT = 2000  # last rows of train.tsv: the sweep's scoring set (no run trains on them)
RESULT_ARGS = ("model", "steps", "eval_every", "sweep_steps", "n_heldout", "batch_size", "k_shot", "n_dev",
               "lora_rank", "int4_group_size")  # a resumed report must have been made with the same


def load_previous(path: Path, args) -> dict:
    """The report at ``path`` to resume from (empty if there is none).

    Raises:
        SystemExit: it was made with other result-changing arguments (one line naming them).
    """
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    changed = [k for k in RESULT_ARGS if old.get("args", {}).get(k) != getattr(args, k)]
    if changed:
        raise SystemExit(f"--resume: {path} was made with other {', '.join(changed)}; "
                         "rerun without --resume or with the same arguments")
    return old


def sweep_from(path: Path, variants) -> tuple[dict, int]:
    """The sweep of an earlier report at ``path`` for ``variants`` (each with its ``chosen`` LR / eps), and
    the number of steps it swept with.

    Raises:
        SystemExit: the file is missing or unreadable, or its sweep lacks one of ``variants``.
    """
    try:
        earlier = json.loads(path.read_text())
        sweep, steps = earlier["sweep"], earlier["args"]["sweep_steps"]
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"--sweep-from: cannot read a sweep from {path}: {e}") from None
    missing = [v for v in variants if "chosen" not in sweep.get(v, {})]
    if missing:
        raise SystemExit(f"--sweep-from: {path} has no chosen LR / eps for {', '.join(missing)}")
    return {v: sweep[v] for v in variants}, steps


def split_train(data_dir: Path, folder: Path) -> tuple[Path, Path]:
    """Write train.tsv minus its last HELDOUT rows, and those rows, as two TSVs (header kept)."""
    src = data_dir / "SST-2" / "train.tsv" if (data_dir / "SST-2").is_dir() else data_dir / "train.tsv"
    lines = src.read_text(encoding="utf-8").splitlines(keepends=True)
    head, rows = lines[0], lines[1:]
    pool, held = folder / "train_pool.tsv", folder / "heldout.tsv"
    pool.write_text(head + "".join(rows[:-HELDOUT]), encoding="utf-8")
    held.write_text(head + "".join(rows[-HELDOUT:]), encoding="utf-8")
    return pool, held


def measure_memory(result: dict, tokenizer, batch, device) -> dict:
    """Resident tensors + the peak of one more training step (as bench/zo_memory.py: the profiler on
    the CPU, ``max_memory_allocated`` on CUDA)."""
    import torch

    from colafx.runtime import tasks
    from colafx.runtime.device import peak_memory_bytes, reset_peak_memory
    from zo_memory import step_peak_bytes, tensor_bytes

    model, opt = result["model"], result["optimizer"]

    def loss():
        return tasks.label_loss(model, tokenizer, tasks.SST2, batch, "candidates")

    if isinstance(opt, torch.optim.Optimizer):
        def step():
            model.train()
            loss().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        def step():
            model.eval()
            opt.step(loss)
    resident = tensor_bytes(model, opt)
    if device.type == "cuda":
        reset_peak_memory(device)
        step()
        transient = peak_memory_bytes(device) - resident
    else:
        transient = step_peak_bytes(step)
    return {"resident_mb": resident / 2**20, "step_peak_mb": transient / 2**20,
            "peak_mb": (resident + transient) / 2**20}


def ordered(by_variant: dict) -> list:
    """``(name, value)`` pairs in VARIANTS order (a JSON report comes back with sorted keys)."""
    return sorted(by_variant.items(), key=lambda kv: list(VARIANTS).index(kv[0]) if kv[0] in VARIANTS else len(VARIANTS))


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main(argv=None) -> int:
    from colafx.runtime.device import DEVICE_HELP

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="model path or 'smollm2'")
    parser.add_argument("--data-dir", default=os.environ.get("COLAFX_DATA", "../shared/data"),
                        help="folder holding SST-2/train.tsv and SST-2/dev.tsv")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), help="runs to make")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (k-shot sets, batches, u)")
    parser.add_argument("--steps", type=int, default=40, help="steps per run (every variant)")
    parser.add_argument("--eval-every", type=int, default=20, help="dev evaluation every N steps")
    parser.add_argument("--sweep-steps", type=int, default=None,
                        help="steps per sweep run (default: --steps, so a LR that diverges later is not picked; "
                             "0: no sweep, the first candidate)")
    parser.add_argument("--sweep-from", default=None, metavar="SST2_JSON",
                        help="take each variant's LR / eps from this earlier report's sweep instead of sweeping again "
                             "(for longer runs with hyper-parameters already picked on held-out data)")
    parser.add_argument("--n-heldout", type=int, default=128, help="held-out training examples scoring the sweep")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per step")
    parser.add_argument("--k-shot", type=int, default=16, help="training examples per class")
    parser.add_argument("--n-dev", type=int, default=256, help="dev examples evaluated (the same for every run)")
    parser.add_argument("--lora-rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--int4-group-size", type=int, default=64, help="int4 weight scale group size (0: per channel)")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--resume", action="store_true",
                        help="reuse the zero-shot, sweep candidates, runs and memory already in OUT/sst2.json "
                             "(same arguments), e.g. after a restart with more threads")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: seed 0, 4 steps, 16 dev / held-out examples, 2-step sweep of one candidate")
    parser.add_argument("--out", default="bench/results", help="folder for sst2.json / sst2.png")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.eval_every, args.n_dev, args.n_heldout = [0], 4, 2, 16, 16
        args.sweep_steps = 2
    if args.sweep_steps is None:
        args.sweep_steps = args.steps
    return run(args)


def run(args) -> int:
    import torch

    from colafx.files import atomic_write_json
    from colafx.runtime import tasks
    from colafx.runtime.device import cpu_features, environment, resolve_device
    from colafx.runtime.finetune import FinetuneConfig, finetune
    from colafx.runtime.models import load_model, load_tokenizer

    print("CPU features:", " ".join(cpu_features()), f"| {torch.get_num_threads()} threads", flush=True)
    t_start = time.perf_counter()
    out, work = Path(args.out), Path(tempfile.mkdtemp(prefix="colafx-sst2-"))
    earlier_sweep = None
    if args.sweep_from:  # before load_previous: it sets the sweep_steps a resumed report is checked against
        earlier_sweep, args.sweep_steps = sweep_from(Path(args.sweep_from), args.variants)
    previous = load_previous(out / "sst2.json", args) if args.resume else {}  # before the model loads
    pool, held = split_train(Path(args.data_dir), work)
    base, tokenizer = load_model(args.model).eval(), load_tokenizer(args.model)
    common = dict(model=args.model, task="sst2", train_file=str(pool), objective="candidates", trainable="lora",
                  lora_rank=args.lora_rank, lora_alpha=2.0 * args.lora_rank, batch_size=args.batch_size,
                  k_shot=args.k_shot, progress=False)
    device = resolve_device(args.device)
    base.to(device)
    common["device"] = str(device)
    report = {"args": vars(args), "sweep": {}, "runs": previous.get("runs", {}), "memory": previous.get("memory", {}),
              "environment": environment(device, "float32"), "resumed": bool(previous)}

    def train(name: str, seed: int, lr: float, eps: float, steps: int, dev_file: Path, n_dev: int, eval_every: int):
        fields = dict(VARIANTS[name])
        if fields.get("bits") == 4:
            fields["group_size"] = args.int4_group_size or None
        config = FinetuneConfig(**common, **fields, dev_file=str(dev_file), n_dev=n_dev, steps=steps,
                                eval_every=eval_every, lr=lr, eps=eps or 1e-3, seed=seed, out=str(work / "run"))
        try:
            return finetune(config, loaded=(copy.deepcopy(base), tokenizer))
        finally:
            shutil.rmtree(work / "run", ignore_errors=True)

    def save():
        atomic_write_json(out / "sst2.json", report)

    out.mkdir(parents=True, exist_ok=True)
    dev_file = Path(args.data_dir) / "SST-2" / "dev.tsv"
    with torch.no_grad():  # zero-shot: the fp32 base on the dev examples every run scores
        dev = tasks.sample_per_class(tasks.read_examples(dev_file, tasks.SST2), 0, 1)[: args.n_dev]
        report["zero_shot"] = previous.get("zero_shot") or tasks.accuracy(base, tokenizer, tasks.SST2, dev)
    print(f"zero-shot fp32: {report['zero_shot']:.4f}", flush=True)

    chosen = {}
    if earlier_sweep:
        report["sweep"] = earlier_sweep
        chosen = {name: (s["chosen"]["lr"], s["chosen"]["eps"]) for name, s in earlier_sweep.items()}
    for name in ([] if earlier_sweep else args.variants):  # the sweep: seed 0, scored on held-out training examples
        family = "adamw" if VARIANTS[name]["method"] == "adamw" else "zo"
        candidates = SWEEP[family][:1] if args.quick else SWEEP[family]
        scores = []
        done = {(c["lr"], c["eps"]): c for c in previous.get("sweep", {}).get(name, {}).get("candidates", [])}
        for lr, eps in (candidates if args.sweep_steps else []):
            if (lr, eps) in done:
                scores.append(done[(lr, eps)])
                continue
            t0 = time.perf_counter()
            result = train(name, 0, lr, eps, args.sweep_steps, held, args.n_heldout, args.sweep_steps)
            scores.append({"lr": lr, "eps": eps, "heldout_acc": result["final"]["dev_acc"],
                           "seconds": time.perf_counter() - t0})
            print(f"sweep {name} lr {lr:g} eps {eps:g}: held-out acc {scores[-1]['heldout_acc']:.4f} "
                  f"({scores[-1]['seconds']:.0f} s)", flush=True)
            report["sweep"][name] = {"candidates": scores}  # saved per candidate, so --resume loses little
            save()
        best = max(scores, key=lambda s: s["heldout_acc"]) if scores else {"lr": SWEEP[family][0][0], "eps": SWEEP[family][0][1]}
        chosen[name] = (best["lr"], best["eps"])
        report["sweep"][name] = {"candidates": scores, "chosen": {"lr": best["lr"], "eps": best["eps"]}}
        save()

    batch = tasks.sample_per_class(tasks.read_examples(pool, tasks.SST2), args.batch_size // 2, 0)
    for seed in args.seeds:  # seeds outermost: a cut-short bench still has every variant at the first seeds
        for name in args.variants:
            if str(seed) in report["runs"].get(name, {}):
                continue  # resumed
            t0 = time.perf_counter()
            result = train(name, seed, *chosen[name], args.steps, dev_file, args.n_dev, args.eval_every)
            history = result["history"]
            curve = [(r["step"], r["dev_acc"]) for r in history if "dev_acc" in r]
            report["runs"].setdefault(name, {})[str(seed)] = {
                "curve": curve, "final_loss": history[-1]["loss"], "seconds": time.perf_counter() - t0,
                "step_s": history[-1]["time_s"] / args.steps}
            if name not in report["memory"]:
                report["memory"][name] = measure_memory(result, tokenizer, batch, device)
            print(f"{name} seed {seed}: {curve} ({time.perf_counter() - t0:.0f} s)", flush=True)
            del result
            save()
    report["total_seconds"] = previous.get("total_seconds", 0.0) + time.perf_counter() - t_start
    save()
    print_tables(report, args)
    plot(report, out / "sst2.png")
    shutil.rmtree(work, ignore_errors=True)
    return 0


def print_tables(report: dict, args) -> None:
    """The sweep and the results as Markdown tables."""
    print(f"\nSST-2, {args.model}, LoRA r{args.lora_rank}, batch {args.batch_size}, {args.k_shot}-shot, "
          f"{args.steps} steps, seeds {args.seeds}, {args.n_dev} dev examples, objective candidates; "
          f"{report['total_seconds'] / 60:.0f} min in all{' (resumed: the runs before the restart not counted)' if report.get('resumed') else ''}\n")
    print("| variant | sweep: lr / eps -> held-out acc | chosen |\n|---|---|---|")
    for name, s in ordered(report["sweep"]):
        cells = ", ".join(f"{c['lr']:g} / {c['eps']:g} -> {c['heldout_acc']:.3f}" for c in s["candidates"])
        print(f"| {name} | {cells or '-'} | {s['chosen']['lr']:g} / {s['chosen']['eps']:g} |")
    mezo = report["runs"].get("mezo-fp32")
    mezo_final = mean_std([r["curve"][-1][1] for r in mezo.values()])[0] if mezo else None
    adamw_mem = report["memory"].get("adamw-fp32", {}).get("peak_mb")
    print("\n| variant | step 0 (its base) | dev acc final (mean ± std) | per seed | vs zero-shot fp32 | vs MeZO "
          "| peak MB | vs AdamW fp32 | s/step |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| zero-shot fp32 | - | {report['zero_shot']:.3f} | - | - | - | - | - | - |")
    for name, seeds in ordered(report["runs"]):
        finals = [r["curve"][-1][1] for r in seeds.values()]
        m, s = mean_std(finals)
        mem = report["memory"].get(name, {}).get("peak_mb")
        start = statistics.mean(r["curve"][0][1] for r in seeds.values())
        print(f"| {name} | {start:.3f} | {m:.3f} ± {s:.3f} | {' '.join(f'{f:.3f}' for f in finals)} | "
              f"{100 * (m - report['zero_shot']):+.1f} | "
              f"{'-' if mezo_final is None else f'{100 * (m - mezo_final):+.1f}'} | "
              f"{'-' if mem is None else f'{mem:.0f}'} | "
              f"{'-' if not (mem and adamw_mem) else f'{mem / adamw_mem:.3f}x'} | "
              f"{statistics.mean(r['step_s'] for r in seeds.values()):.2f} |")


def plot(report: dict, path: Path) -> None:
    """Mean ± std dev accuracy against step, one band per variant (atomic write)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from colafx.files import atomic_write_bytes

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for name, seeds in ordered(report["runs"]):
        curves = [r["curve"] for r in seeds.values()]
        steps = [s for s, _ in curves[0]]
        stats = [mean_std([c[i][1] for c in curves]) for i in range(len(steps))]
        ax.plot(steps, [m for m, _ in stats], marker="o", label=f"{name} ({len(curves)} seeds)")
        ax.fill_between(steps, [m - s for m, s in stats], [m + s for m, s in stats], alpha=0.15)
    ax.axhline(report["zero_shot"], color="grey", linestyle="--", label="zero-shot fp32")
    ax.set_xlabel("step")
    ax.set_ylabel("SST-2 dev accuracy (mean ± std)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write_bytes(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
