"""Peak memory and time of one training step: dense, CoLA, CoLA-M, CoLA + full-block checkpointing,
and compiled CoLA vs compiled CoLA-M (``torch.compile(backend="colafx")``, Inductor).

    python bench/memory.py [--preset llama-60m] [--batch-size 4] [--seq-len 256] [--repeats 5]
                           [--variants dense CoLA CoLA-M ...]

A step is forward + loss + backward in fp32 on the CPU (gradients set to None first, so their
allocation counts; the optimizer update is left out: its state is the same for every CoLA variant).
Memory: the ``self_cpu_memory_usage`` of all ``torch.profiler`` events (profile_memory=True) summed
in time order; the peak of that running sum, and its value when backward starts (activations kept
for backward, plus the loss' logits buffers). Time: median over ``--repeats`` steps with the
variants interleaved (the order rotates every round). Prints a Markdown table and writes
memory.json + memory.png to ``--out``.
"""
import argparse
import copy
import statistics
from pathlib import Path

import torch
from tqdm import tqdm

import colafx
from colafx import presets
from colafx.files import atomic_write_bytes, atomic_write_json
from colafx.runtime.device import DEVICE_HELP, environment, resolve_device, timed

VARIANTS = ("dense", "CoLA", "CoLA-M", "CoLA + full ckpt", "compiled CoLA", "compiled CoLA-M")


def build_variants(preset: str, seed: int, names=VARIANTS) -> dict[str, torch.nn.Module]:
    """The models of the comparison (those in ``names``); the CoLA ones share the same weights. The
    compiled ones compile on their first (warm-up) step."""
    dense = presets.build(preset, seed=seed)
    cola = colafx.colaify(copy.deepcopy(dense), rank=presets.get(preset).rank,
                          generator=torch.Generator().manual_seed(seed))
    make = {
        "dense": lambda: dense,
        "CoLA": lambda: cola,
        "CoLA-M": lambda: colafx.enable_recompute(copy.deepcopy(cola), policy="cola-m"),
        "CoLA + full ckpt": lambda: colafx.enable_recompute(copy.deepcopy(cola), policy="full"),
        "compiled CoLA": lambda: torch.compile(copy.deepcopy(cola), backend="colafx"),
        "compiled CoLA-M": lambda: torch.compile(copy.deepcopy(cola), backend="colafx", options={"recompute": True}),
    }
    models = {name: make[name]() for name in VARIANTS if name in names}
    for model in models.values():
        model.train()
    return models


def train_step(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """Forward, loss and backward; returns the loss."""
    model.zero_grad(set_to_none=True)
    with torch.profiler.record_function("bench::forward"):
        loss = model(input_ids=ids, labels=ids).loss
    with torch.profiler.record_function("bench::backward"):
        loss.backward()
    return loss.item()


def profile_memory(model: torch.nn.Module, ids: torch.Tensor) -> dict:
    """Peak of the running sum of profiler memory events over one step, and its value when
    backward starts (both in bytes, relative to the start of the step). On CUDA: the step's
    ``torch.cuda.max_memory_allocated`` above what was allocated before it, and the allocation
    growth at the end of the forward."""
    model.zero_grad(set_to_none=True)  # outside the profile: freeing last step's gradients is not this step's
    if ids.is_cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = model(input_ids=ids, labels=ids).loss
        kept = torch.cuda.memory_allocated() - base
        loss.backward()
        torch.cuda.synchronize()
        return {"peak_bytes": torch.cuda.max_memory_allocated() - base, "kept_for_backward_bytes": kept}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        train_step(model, ids)
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    backward_start = next(e.time_range.start for e in events if e.name == "bench::backward")
    running, peak, at_backward = 0, 0, None
    for event in events:
        if at_backward is None and event.time_range.start >= backward_start:
            at_backward = running
        running += event.self_cpu_memory_usage
        peak = max(peak, running)
    return {"peak_bytes": peak, "kept_for_backward_bytes": at_backward}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--preset", default="llama-60m", choices=presets.names(), help="model size (CoLA rank: the preset's)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per variant (median reported)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and token ids")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, metavar="NAME",
                        help=f"variants to run, from {', '.join(VARIANTS)} (CoLA is the reference and always runs)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for memory.json and memory.png")
    args = parser.parse_args()

    device = resolve_device(args.device)
    args.device = str(device)
    names = tuple(v for v in VARIANTS if v in set(args.variants) | {"CoLA"})
    models = {name: model.to(device) for name, model in build_variants(args.preset, args.seed, names).items()}
    vocab = presets.get(args.preset).vocab_size
    ids = torch.randint(0, vocab, (args.batch_size, args.seq_len),
                        generator=torch.Generator().manual_seed(args.seed)).to(device)
    times = {name: [] for name in names}
    losses, memory = {}, {}
    bar = tqdm(total=len(names) * (args.repeats + 3), desc="steps", unit="step")
    for name, model in models.items():  # two warm-up steps (compiled: compile, then a cached run), then profiled
        train_step(model, ids)
        losses[name] = train_step(model, ids)
        memory[name] = profile_memory(model, ids)
        bar.update(3)
    for rnd in range(args.repeats):
        order = names[rnd % len(names):] + names[:rnd % len(names)]
        for name in order:
            with timed(device, times[name]):
                train_step(models[name], ids)
            bar.update(1)
    bar.close()

    rows = []
    for name in names:
        rows.append({"variant": name, "loss": losses[name], "step_s_median": statistics.median(times[name]),
                     "step_s_all": times[name], **memory[name]})
    cola = next(r for r in rows if r["variant"] == "CoLA")
    print(f"\n{args.preset}, batch {args.batch_size} x seq {args.seq_len}, fp32 {device}, forward + backward "
          f"({torch.get_num_threads()} threads, median of {args.repeats})")
    env = environment(device, "fp32")
    print(f"{env['device_name']}; CPU features: {' '.join(env['cpu_features']) or 'none detected'}\n")
    print("| variant | peak MiB | vs CoLA | kept for backward MiB | vs CoLA | step s | vs CoLA |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['peak_bytes'] / 2**20:.0f} | {r['peak_bytes'] / cola['peak_bytes']:.2f}x | "
              f"{r['kept_for_backward_bytes'] / 2**20:.0f} | "
              f"{r['kept_for_backward_bytes'] / cola['kept_for_backward_bytes']:.2f}x | "
              f"{r['step_s_median']:.2f} | {r['step_s_median'] / cola['step_s_median']:.2f}x |")

    args.out.mkdir(parents=True, exist_ok=True)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    atomic_write_json(args.out / "memory.json", {"config": config, "threads": torch.get_num_threads(), "rows": rows,
                                                    "environment": env})
    atomic_write_bytes(args.out / "memory.png", lambda tmp: plot(rows, args, tmp))


def plot(rows: list[dict], args, path: str) -> None:
    """Two bar charts side by side: peak / kept-for-backward memory and median step time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in rows]
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(10, 4))
    x = range(len(rows))
    ax_mem.bar([i - 0.2 for i in x], [r["peak_bytes"] / 2**20 for r in rows], 0.4, label="peak")
    ax_mem.bar([i + 0.2 for i in x], [r["kept_for_backward_bytes"] / 2**20 for r in rows], 0.4,
               label="kept for backward")
    ax_mem.set_ylabel("MiB")
    ax_mem.legend()
    ax_time.bar(list(x), [r["step_s_median"] for r in rows], 0.6, color="tab:green")
    ax_time.set_ylabel("seconds per step (median)")
    for ax, title in ((ax_mem, "training-step memory"), (ax_time, "step time")):
        ax.set_xticks(list(x), names, rotation=15)
        ax.set_title(title)
    fig.suptitle(f"{args.preset}, batch {args.batch_size} x seq {args.seq_len}, fp32 {args.device}")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
