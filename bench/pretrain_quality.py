"""Pre-training quality, dense vs CoLA on WikiText-2: (a) equal tokens, (b) equal training FLOPs.

    python bench/pretrain_quality.py /path/to/wikitext-2 [--preset llama-small] [--steps 300] [--out bench/results]

Three runs of ``colafx.runtime.pretrain.train`` share one byte-level BPE and the same data order:
dense for ``--steps`` steps, CoLA for the same steps (equal tokens), and CoLA for ``--steps`` x the
dense/CoLA FLOP ratio (equal training FLOPs). Then dense and CoLA training steps are timed
interleaved in one process (medians) for a throughput ratio that the machine's load affects equally.
Prints a Markdown table; writes pretrain_quality.json and two PNGs (validation loss vs tokens and vs
FLOPs) to ``--out``.
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import colafx
from colafx import presets
from colafx.runtime import data as D
from colafx.runtime.plot import plot_curves
from colafx.runtime.pretrain import PretrainConfig, next_token_loss, train


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("wikitext", type=Path, help="WikiText-2 folder with train.txt and valid.txt")
    parser.add_argument("--preset", default="llama-small", choices=presets.names(), help="model size")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    parser.add_argument("--steps", type=int, default=300, help="steps of the dense and equal-token CoLA runs")
    parser.add_argument("--lr", type=float, default=None, help="peak LR for all runs (default: the preset's)")
    parser.add_argument("--train-chars", type=int, default=1_500_000, help="characters of train.txt used")
    parser.add_argument("--val-chars", type=int, default=400_000, help="characters of valid.txt used")
    parser.add_argument("--eval-blocks", type=int, default=96, help="validation sequences per evaluation")
    parser.add_argument("--evals", type=int, default=4, help="evaluations per run (curve points)")
    parser.add_argument("--speed-steps", type=int, default=5, help="interleaved timing steps per variant")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weight and compute dtype")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for JSON and PNGs")
    args = parser.parse_args()
    torch.set_num_threads(2)

    train_text = (args.wikitext / "train.txt").read_text(encoding="utf-8")[: args.train_chars]
    val_text = (args.wikitext / "valid.txt").read_text(encoding="utf-8")[: args.val_chars]
    work = Path(tempfile.mkdtemp(prefix="pretrain_quality_"))
    tokenizer = D.train_tokenizer([train_text], presets.get(args.preset).vocab_size)
    tokenizer.save_pretrained(work / "tokenizer")

    rank = presets.get(args.preset).rank
    p = colafx.plan(presets.build(args.preset, device="meta", vocab_size=len(tokenizer)), rank=rank,
                    seq_len=args.seq_len)
    ratio = p.flops_before / p.flops_after
    runs = [("dense", True, args.steps), ("CoLA, equal tokens", False, args.steps),
            ("CoLA, equal FLOPs", False, round(args.steps * ratio))]
    results = []
    for name, dense, steps in runs:
        config = PretrainConfig(
            preset=args.preset, dense=dense, dtype=args.dtype, data=[train_text], val_data=[val_text],
            tokenizer=str(work / "tokenizer"), seq_len=args.seq_len, batch_size=args.batch_size, steps=steps,
            lr=args.lr, warmup=max(1, steps // 10), eval_every=max(1, steps // args.evals),
            eval_blocks=args.eval_blocks, out=str(work / name.replace(" ", "_").replace(",", "")))
        start = time.perf_counter()
        r = train(config)
        wall = time.perf_counter() - start
        curve = [(row["tokens"], row["loss"]) for row in r.history if row["split"] == "val"]
        results.append({"run": name, "dense": dense, "steps": steps, "tokens": r.tokens,
                        "train_flops": r.flops_per_token * r.tokens, "val_loss": r.val_loss, "val_ppl": r.val_ppl,
                        "tokens_per_s": r.tokens_per_s, "wall_s": wall, "params": r.params, "val_curve": curve,
                        "flops_per_token": r.flops_per_token})

    speed = interleaved_speed(args, tokenizer, rank, train_text)
    print_table(args, results, speed, ratio)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pretrain_quality.json").write_text(json.dumps(
        {"preset": args.preset, "rank": rank, "seq_len": args.seq_len, "batch_size": args.batch_size,
         "dtype": args.dtype, "flop_ratio": ratio, "runs": results, "interleaved_speed": speed}, indent=2))
    plot_curves({r["run"]: r["val_curve"] for r in results}, args.out / "pretrain_quality_tokens.png",
                xlabel="training tokens", ylabel="validation loss", title=f"{args.preset} on WikiText-2")
    plot_curves({r["run"]: [(t * r["flops_per_token"] / 1e12, y) for t, y in r["val_curve"]] for r in results},
                args.out / "pretrain_quality_flops.png", xlabel="training TFLOPs", ylabel="validation loss",
                title=f"{args.preset} on WikiText-2")


def interleaved_speed(args, tokenizer, rank, train_text) -> dict:
    """Median training-step time of dense and CoLA, alternating steps so both see the same load."""
    blocks = D.pack(D.encode([train_text[:400_000]], tokenizer), args.seq_len, tokenizer.eos_token_id)
    batch = blocks[: args.batch_size]
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    models = {}
    for name in ("dense", "CoLA"):
        m = presets.build(args.preset, seed=0, vocab_size=len(tokenizer), dtype=dtype)
        if name == "CoLA":
            colafx.colaify(m, rank=rank)
        models[name] = (m, torch.optim.AdamW(m.parameters(), lr=1e-4))
    times = {name: [] for name in models}
    for _ in range(args.speed_steps + 1):  # the first round warms up and is dropped
        for name, (m, opt) in models.items():
            t0 = time.perf_counter()
            next_token_loss(m, batch).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times[name].append(time.perf_counter() - t0)
    tokens = args.batch_size * args.seq_len
    return {name: tokens / statistics.median(t[1:]) for name, t in times.items()}


def print_table(args, results, speed, ratio):
    dense = results[0]
    print(f"\n{args.preset}, seq {args.seq_len}, batch {args.batch_size}, {args.dtype}, WikiText-2 "
          f"(dense/CoLA training FLOPs per token: {ratio:.2f}x)\n")
    print("| run | params | steps | tokens | train TFLOPs | val loss | val ppl | ppl vs dense | tok/s | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['run']} | {r['params'] / 1e6:.2f}M | {r['steps']} | {r['tokens']:,} | "
              f"{r['train_flops'] / 1e12:.2f} | {r['val_loss']:.3f} | {r['val_ppl']:.1f} | "
              f"{r['val_ppl'] / dense['val_ppl']:.3f}x | {r['tokens_per_s']:.0f} | {r['wall_s']:.0f} |")
    print(f"\nInterleaved training-step throughput (median of {args.speed_steps}): dense {speed['dense']:.0f} tok/s, "
          f"CoLA {speed['CoLA']:.0f} tok/s, ratio {speed['CoLA'] / speed['dense']:.2f}x")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
