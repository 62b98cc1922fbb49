"""Parameters and forward FLOPs/token, dense vs CoLA, for every paper preset (from colafx.plan).

    python bench/flops.py [--seq-len 256] [--out bench/results]
Prints a Markdown table and writes flops.json. Training FLOPs/token ≈ 3 × forward.
"""
import argparse
import json
from pathlib import Path

import colafx
from colafx import presets

PAPER = ["llama-60m", "llama-130m", "llama-350m", "llama-1b", "llama-7b"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=256, help="sequence length (attention FLOPs depend on it)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for flops.json")
    args = parser.parse_args()
    rows = []
    for name in PAPER:
        preset = presets.get(name)
        p = colafx.plan(presets.build(name, device="meta"), rank=preset.rank, seq_len=args.seq_len)
        rows.append({"preset": name, "rank": preset.rank, "params_dense": p.params_before,
                     "params_cola": p.params_after, "fwd_flops_dense": p.flops_before,
                     "fwd_flops_cola": p.flops_after})
    print(f"| preset | rank | params dense | params CoLA | ratio | GFLOP/token fwd dense | CoLA | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['rank']} | {r['params_dense'] / 1e6:.2f}M | {r['params_cola'] / 1e6:.2f}M | "
              f"{r['params_dense'] / r['params_cola']:.2f}x | {r['fwd_flops_dense'] / 1e9:.3f} | "
              f"{r['fwd_flops_cola'] / 1e9:.3f} | {r['fwd_flops_dense'] / r['fwd_flops_cola']:.2f}x |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "flops.json").write_text(json.dumps({"seq_len": args.seq_len, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
