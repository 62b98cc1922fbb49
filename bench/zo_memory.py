"""Peak memory and time of one fine-tuning step: AdamW fp32, MeZO fp32, QuZO int8, QuZO int4.

    python bench/zo_memory.py                   # SmolLM2-135M, batch 16 SST-2 prompts, CPU

Every variant trains all projections (q, k, v, o, gate, up, down; embeddings and head frozen) on
the same batch. Peak = resident weights, buffers and optimizer state + the peak of the step's
own allocations (torch.profiler ``self_cpu_memory_usage`` summed in time order). Step times are
medians over interleaved repeats. Writes ``zo_memory.json`` / ``zo_memory.png`` to ``--out``.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

VARIANTS = ("adamw-fp32", "mezo-fp32", "quzo-int8", "quzo-int4")


def tensor_bytes(model, optimizer) -> int:
    """Bytes of the model's parameters and buffers plus the optimizer's state tensors."""
    tensors = list(model.parameters()) + list(model.buffers())
    if isinstance(optimizer, torch.optim.Optimizer):
        tensors += [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    seen, total = set(), 0
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def step_peak_bytes(step) -> int:
    """Peak of the running sum of ``self_cpu_memory_usage`` over the profiled events of ``step()``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def make_step(name, base, tokenizer, task, batch, lr):
    """Build variant ``name`` from a copy of ``base``; return (model, optimizer, step function)."""
    from colafx.runtime import tasks
    from colafx.runtime.zo import QuZO, zo_targets
    from colafx.transform.quantize import QuantConfig, quantize_

    model = copy.deepcopy(base)
    if name.startswith("quzo"):
        quantize_(model, QuantConfig(weight_bits=int(name[-1]), act_bits=8, zo_headroom=True))
    targets = zo_targets(model, "all")
    for p in model.parameters():
        p.requires_grad_(False)

    def loss():
        return tasks.label_loss(model, tokenizer, task, batch)

    if name == "adamw-fp32":
        for p in targets:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(targets, lr=lr)

        def step():
            model.train()
            loss().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return model, opt, step
    opt = QuZO(targets, lr=lr, eps=1e-3, method=name.split("-")[0])
    model.eval()
    return model, opt, lambda: opt.step(loss)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="model path or 'smollm2'")
    parser.add_argument("--data-dir", default=os.environ.get("COLAFX_DATA", "../shared/data"),
                        help="folder holding SST-2/train.tsv")
    parser.add_argument("--batch-size", type=int, default=16, help="SST-2 prompts per step")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per variant (interleaved)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, help="variants to run")
    parser.add_argument("--out", default="bench/results", help="folder for zo_memory.json / zo_memory.png")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's; 1 on a shared machine, where a second "
                             "OpenMP thread mostly measures the scheduler)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    from tqdm import tqdm

    from colafx.runtime import tasks
    from colafx.runtime.models import load_model, load_tokenizer

    base, tokenizer = load_model(args.model), load_tokenizer(args.model)
    folder = Path(args.data_dir) / "SST-2" if (Path(args.data_dir) / "SST-2").is_dir() else Path(args.data_dir)
    batch = tasks.sample_per_class(tasks.read_examples(folder / "train.tsv", tasks.SST2), 0, 0)[: args.batch_size]

    results = {}
    for name in tqdm(args.variants, desc="memory"):
        model, opt, step = make_step(name, base, tokenizer, tasks.SST2, batch, lr=1e-6)
        step()  # warm-up: allocates AdamW state, resolves the int8 GEMM backend
        transient = step_peak_bytes(step)
        resident = tensor_bytes(model, opt)
        results[name] = {"resident_mb": resident / 2**20, "step_peak_mb": transient / 2**20,
                         "peak_mb": (resident + transient) / 2**20, "times": [], "state": (model, opt, step)}
    for _ in tqdm(range(args.repeats), desc="timing"):
        for name in args.variants:  # interleaved, so machine noise hits every variant alike
            start = time.perf_counter()
            results[name]["state"][2]()
            results[name]["times"].append(time.perf_counter() - start)
    for r in results.values():
        r.pop("state")
        r["step_s"] = statistics.median(r["times"])

    ref = {k: results[k] for k in ("adamw-fp32", "mezo-fp32") if k in results}
    lines = ["| variant | resident MB | step peak MB | peak MB | vs adamw | vs mezo | step s (median) | time vs mezo |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        vs = [f"{r['peak_mb'] / ref[k]['peak_mb']:.3f}x" if k in ref else "-" for k in ("adamw-fp32", "mezo-fp32")]
        tvs = f"{r['step_s'] / ref['mezo-fp32']['step_s']:.2f}x" if "mezo-fp32" in ref else "-"
        lines.append(f"| {name} | {r['resident_mb']:.0f} | {r['step_peak_mb']:.0f} | {r['peak_mb']:.0f} | "
                     f"{vs[0]} | {vs[1]} | {r['step_s']:.2f} | {tvs} |")
    from colafx.kernels.qmatmul import cpu_int8_backend
    from colafx.runtime.device import cpu_features

    print(f"{args.model}, batch {args.batch_size} SST-2 prompts, {torch.get_num_threads()} threads, CPU features: "
          f"{' '.join(cpu_features()) or 'unknown'}, int8 backend {cpu_int8_backend()}\n")
    print("\n".join(lines))

    from colafx.files import atomic_write_bytes, atomic_write_json

    from colafx.runtime.device import environment

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "zo_memory.json", {"args": vars(args), "results": results,
                                               "environment": environment(torch.device("cpu"), None)})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    names = list(results)
    a.bar(names, [results[n]["peak_mb"] for n in names])
    a.set_ylabel("peak step memory (MB)")
    b.bar(names, [results[n]["step_s"] for n in names])
    b.set_ylabel("step time (s, median)")
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    atomic_write_bytes(out / "zo_memory.png", lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return 0


if __name__ == "__main__":
    sys.exit(main())
