"""Training-step throughput on the CPU: eager dense, eager CoLA, torch.compile(backend="colafx") CoLA.

    python bench/compile.py [--preset llama-60m] [--batch 4] [--seq-len 256] [--steps 3] [--out bench/results]

Each variant owns a model (same seed) and an AdamW optimizer; a step is forward + backward +
optimizer step on random tokens. After one warm-up step per variant (for compiled variants it
includes compilation: compile time = first step − median step), the variants' steps are interleaved
round by round and the median is reported, so load from other processes hits all variants alike.
Prints a Markdown table, writes compile.json and compile.png to --out.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from tqdm import tqdm

import colafx
from colafx import presets
from colafx.files import atomic_write_bytes, atomic_write_json
from colafx.runtime.device import DEVICE_HELP, environment, resolve_device, timed

# name -> (colaify, compile options or None for eager, autocast to bf16)
VARIANTS = {
    "eager-dense": (False, None, False),
    "eager-cola": (True, None, False),
    "compiled-cola": (True, {}, False),
    "eager-cola-bf16": (True, None, True),
    "compiled-cola-bf16": (True, {}, True),
    "compiled-cola-lowered": (True, {"fuse_lowrank": True}, False),
    "compiled-cola-recompute": (True, {"recompute": True}, False),
}
DEFAULT = ["eager-dense", "eager-cola", "compiled-cola", "eager-cola-bf16", "compiled-cola-bf16"]


def build(name: str, args, device: torch.device) -> dict:
    """Model, optimizer and step function of variant ``name`` on ``device``."""
    cola, options, bf16 = VARIANTS[name]
    model = presets.build(args.preset, seed=0)
    if cola:
        colafx.colaify(model, rank=presets.get(args.preset).rank, generator=torch.Generator().manual_seed(0))
    model.to(device)
    runner = model if options is None else torch.compile(model, backend="colafx", options=options)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(ids: torch.Tensor) -> float:
        times = []
        with timed(device, times):  # synchronises CUDA before and after
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = runner(input_ids=ids, labels=ids).loss
            if not torch.isfinite(loss):
                raise RuntimeError(f"{name}: loss is {loss.item()}")
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return times[0]

    return {"step": step, "compiled": options is not None, "times": []}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--preset", default="llama-60m", choices=presets.names(), help="model size")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up)")
    parser.add_argument("--variants", nargs="+", default=DEFAULT, choices=list(VARIANTS),
                        help=f"what to run (default: {' '.join(DEFAULT)})")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for compile.json/.png")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    args = parser.parse_args()
    device = resolve_device(args.device)
    if args.batch < 1 or args.seq_len < 2 or args.steps < 1:
        parser.error("--batch, --steps must be >= 1 and --seq-len >= 2")

    ids = torch.randint(0, presets.get(args.preset).vocab_size, (args.batch, args.seq_len),
                        generator=torch.Generator().manual_seed(0)).to(device)
    runs = {}
    bar = tqdm(total=len(args.variants) * (args.steps + 1), desc="steps")
    for name in args.variants:  # warm-up (and compilation) one variant at a time
        runs[name] = build(name, args, device)
        runs[name]["first"] = runs[name]["step"](ids)
        bar.update()
    for _ in range(args.steps):
        for name in args.variants:
            runs[name]["times"].append(runs[name]["step"](ids))
            bar.update()
    bar.close()

    tokens = args.batch * args.seq_len
    rows = []
    for name in args.variants:
        run = runs[name]
        median = statistics.median(run["times"])
        rows.append({"variant": name, "median_s": median, "tokens_per_s": tokens / median,
                     "times_s": run["times"],
                     "compile_s": max(0.0, run["first"] - median) if run["compiled"] else None})
    by_name = {r["variant"]: r for r in rows}
    speedups = {f"{c}/{e}": by_name[c]["tokens_per_s"] / by_name[e]["tokens_per_s"]
                for c, e in (("compiled-cola", "eager-cola"), ("compiled-cola-bf16", "eager-cola-bf16"),
                             ("eager-cola", "eager-dense"), ("compiled-cola-bf16", "eager-cola"),
                             ("compiled-cola-lowered", "eager-cola"), ("compiled-cola-recompute", "eager-cola"))
                if c in by_name and e in by_name}

    print(f"\n{args.preset} on {device}, batch {args.batch} x seq {args.seq_len}, AdamW step, "
          f"median of {args.steps} interleaved steps, {torch.get_num_threads()} threads\n")
    print("| variant | step (s) | tokens/s | compile (s) |")
    print("|---|---|---|---|")
    for r in rows:
        compile_s = "" if r["compile_s"] is None else f"{r['compile_s']:.0f}"
        print(f"| {r['variant']} | {r['median_s']:.2f} | {r['tokens_per_s']:.0f} | {compile_s} |")
    print()
    for key, value in speedups.items():
        print(f"- {key}: {value:.2f}x tokens/s")

    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "compile.json", {
        "preset": args.preset, "batch": args.batch, "seq_len": args.seq_len, "steps": args.steps,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows, "speedups": speedups,
        "environment": environment(device, "fp32")})
    plot(rows, args, args.out / "compile.png")


def plot(rows: list[dict], args, path: Path) -> None:
    """Bar chart of tokens/s per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh([r["variant"] for r in rows], [r["tokens_per_s"] for r in rows], color="tab:blue")
    ax.invert_yaxis()
    ax.set_xlabel("tokens/s (training step, CPU)")
    ax.set_title(f"{args.preset}, batch {args.batch} x seq {args.seq_len}")
    fig.tight_layout()
    atomic_write_bytes(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


if __name__ == "__main__":
    main()
