"""SST-2 dev accuracy: zero-shot vs MeZO (fp32) vs QuZO int8 / int4 after N steps, with curves.

    python bench/sst2.py --steps 200            # SmolLM2-135M, CPU; prints a Markdown table

Every variant starts from the same model and sees the same k-shot training set, batches and dev set.
Writes ``sst2.json`` and ``sst2.png`` (dev accuracy against step) to ``--out``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {  # name -> (method, bits)
    "mezo-fp32": ("mezo", 8),
    "quzo-int8": ("quzo", 8),
    "quzo-int4": ("quzo", 4),
}


def write_json(out: Path, args, runs: dict) -> None:
    """Write what has been measured so far to ``out/sst2.json`` (after every variant)."""
    import torch

    from colafx.files import atomic_write_json
    from colafx.runtime.device import environment

    out.mkdir(parents=True, exist_ok=True)
    zero_shot = runs["mezo-fp32"]["curve"][0][1] if "mezo-fp32" in runs else None
    atomic_write_json(out / "sst2.json", {"args": vars(args), "zero_shot_fp32": zero_shot, "runs": runs,
                                         "environment": environment(torch.device("cpu"), None)})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="model path or 'smollm2'")
    parser.add_argument("--data-dir", default=os.environ.get("COLAFX_DATA", "../shared/data"),
                        help="folder holding SST-2/train.tsv and SST-2/dev.tsv")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), help="runs to make")
    parser.add_argument("--steps", type=int, default=200, help="ZO steps per variant")
    parser.add_argument("--trainable", default="lora", choices=["all", "lora"],
                        help="train all projections or LoRA adapters on the frozen (quantized) base")
    parser.add_argument("--lr", type=float, default=1e-4, help="learning rate (same for every variant)")
    parser.add_argument("--eps", type=float, default=1e-3, help="ZO perturbation scale")
    parser.add_argument("--objective", default="candidates", choices=["vocab", "candidates"],
                        help="loss: cross-entropy over the label words ('candidates', MeZO's "
                             "train_as_classification) or over the vocabulary ('vocab')")
    parser.add_argument("--act-bits", type=int, default=8, choices=[8, 16],
                        help="QuZO activation bits (8: int8 GEMM; 16: weight-only)")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per step")
    parser.add_argument("--k-shot", type=int, default=256, help="training examples per class")
    parser.add_argument("--n-dev", type=int, default=200, help="dev examples evaluated")
    parser.add_argument("--eval-every", type=int, default=50, help="evaluate every N steps")
    parser.add_argument("--seed", type=int, default=0, help="seed of data sampling and perturbations")
    parser.add_argument("--out", default="bench/results", help="folder for sst2.json / sst2.png")
    parser.add_argument("--runs-dir", default=None,
                        help="folder for each run's metrics.jsonl / curve.png / checkpoint (default: a temporary folder)")
    args = parser.parse_args(argv)

    from colafx.runtime.finetune import FinetuneConfig, finetune

    out = Path(args.out)
    runs_dir = Path(args.runs_dir or tempfile.mkdtemp(prefix="colafx-sst2-"))  # checkpoints: not in results
    runs = {}
    for name in args.variants:
        method, bits = VARIANTS[name]
        config = FinetuneConfig(model=args.model, data_dir=args.data_dir, method=method, bits=bits, act_bits=args.act_bits,
                                trainable=args.trainable, objective=args.objective, steps=args.steps, lr=args.lr, eps=args.eps,
                                batch_size=args.batch_size, k_shot=args.k_shot, n_dev=args.n_dev,
                                eval_every=args.eval_every, seed=args.seed, out=str(runs_dir / name))
        start = time.perf_counter()
        history = finetune(config)["history"]
        curve = [(r["step"], r["dev_acc"]) for r in history if "dev_acc" in r]
        runs[name] = {"curve": curve, "seconds": time.perf_counter() - start,
                      "step_s": history[-1]["time_s"] / args.steps}
        print(f"{name}: {curve}", file=sys.stderr, flush=True)
        write_json(out, args, runs)

    lines = [f"SST-2 dev ({args.n_dev} examples), {args.model}, {args.trainable}, lr {args.lr}, eps {args.eps}, "
             f"batch {args.batch_size}, {args.k_shot}-shot, {args.steps} steps, objective {args.objective}", "",
             "| variant | dev acc step 0 (zero-shot) | dev acc final | best | s/step (incl. evals) |", "|---|---|---|---|---|"]
    for name, r in runs.items():
        accs = [a for _, a in r["curve"]]
        lines.append(f"| {name} | {accs[0]:.3f} | {accs[-1]:.3f} | {max(accs):.3f} | {r['step_s']:.2f} |")
    print("\n".join(lines))
    from colafx.files import atomic_write_bytes

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, r in runs.items():
        ax.plot(*zip(*r["curve"]), marker="o", label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("SST-2 dev accuracy")
    ax.legend()
    fig.tight_layout()
    atomic_write_bytes(out / "sst2.png", lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return 0


if __name__ == "__main__":
    sys.exit(main())
