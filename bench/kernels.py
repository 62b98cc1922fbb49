"""Quantized-matmul kernels at LLaMA shapes: CPU W8A8 (``colafx::int8_linear``) vs fp32 ``F.linear``.

    python bench/kernels.py [--dims 576 1024 2048] [--tokens 1 16 128 512 2048] [--repeats 5]

For every shape ``x [tokens, d] · W [d, d]ᵀ`` the variants are timed interleaved (each repeat runs
all of them once, in turn) and the median is reported, because the machine is shared:

* ``fp32``: ``F.linear`` (the reference);
* ``w8a8``: ``colafx.kernels.int8_linear`` end to end (per-token activation quantization, the exact
  int8 GEMM of the selected CPU backend, fp32 rescale);
* ``gemm``: the bare int8×int8→int32 GEMM of that backend, and ``torch._int_mm`` itself when that
  is not the backend (slow on CPUs without AVX-VNNI, so only up to ``--int-mm-max-tokens``).

It also prints the quantization error (SQNR dB, higher is better) of W8A8 / W4A8 / W4A16 against
the fp32 product on random LLaMA-like data, and on CUDA times the Triton kernels against cuBLAS
fp16 and ``torch._int_mm`` (else prints "no CUDA"). Writes ``kernels.json`` and ``kernels.png``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from colafx.kernels import int4_linear, int8_linear, quantize_act_int8, quantize_weight
from colafx.kernels.qmatmul import cpu_int8_backend, int8_gemm_cpu, set_cpu_int8_backend
from colafx.transform.quantize import sqnr_db


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dims", type=int, nargs="+", default=[576, 1024, 2048],
                   help="model widths d (the weight is [d, d]; 576 = SmolLM2-135M, 2048 = LLaMA-1B)")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128, 512, 2048],
                   help="rows of x (1 = one decode step, 2048 = a long prefill)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timing repeats (median reported)")
    p.add_argument("--min-time", type=float, default=0.02,
                   help="seconds per timed sample (a call is looped until this is reached)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1: on a shared 2-core machine a second OpenMP thread "
                        "mostly measures the scheduler)")
    p.add_argument("--backend", choices=["auto", "int_mm", "onednn"], default="auto",
                   help="CPU int8 GEMM behind int8_linear (auto = the faster one, timed once)")
    p.add_argument("--int-mm-max-tokens", type=int, default=16,
                   help="also time torch._int_mm itself up to this many tokens (0: never; it is very slow "
                        "on CPUs without AVX-VNNI)")
    p.add_argument("--sqnr-tokens", type=int, default=256, help="rows of x for the SQNR table")
    p.add_argument("--group-size", type=int, default=32, help="group size of the int4 weights")
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for kernels.json / .png")
    args = p.parse_args(argv)
    if min(args.dims + args.tokens) < 1 or args.repeats < 1:
        p.error("dims, tokens and repeats must be positive")
    if any(d % args.group_size or d % 2 for d in args.dims):
        p.error(f"every d must be even and divisible by --group-size {args.group_size}")
    return args


def sample(fn, min_time: float) -> float:
    """Seconds per call of ``fn``: loops until ``min_time`` has elapsed (at least one call)."""
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return elapsed / calls


def interleaved(fns: dict, repeats: int, min_time: float) -> dict:
    """Median seconds per call of each ``fns[name]``, the variants taking turns in every repeat."""
    for fn in fns.values():
        fn()  # warm-up (oneDNN weight prepacking, allocator)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(sample(fn, min_time))
    return {name: statistics.median(t) for name, t in times.items()}


def llama_like(tokens: int, d: int, seed: int):
    """Activations with a few outlier channels (as in LLaMA hidden states) and a 1/√d weight."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d, generator=gen)
    x[:, torch.randperm(d, generator=gen)[: max(1, d // 128)]] *= 8
    w = torch.randn(d, d, generator=gen) / d**0.5
    return x, w


def cpu_rows(args) -> list[dict]:
    """Interleaved timings of fp32 F.linear vs W8A8 (and the bare GEMMs) for every shape."""
    rows = []
    backend = cpu_int8_backend()
    for d in args.dims:
        for m in args.tokens:
            x, w = llama_like(m, d, seed=d + m)
            qw = quantize_weight(w, 8)
            qx, _ = quantize_act_int8(x)
            fns = {"fp32": lambda: F.linear(x, w),
                   "w8a8": lambda: int8_linear(x, qw.qweight, qw.scale),
                   "gemm": lambda: int8_gemm_cpu(qx, qw.qweight, cache_key=qw.qweight)}
            if m <= args.int_mm_max_tokens and backend != "int_mm":
                fns["int_mm"] = lambda: int8_gemm_cpu(qx, qw.qweight, backend="int_mm")
            t = interleaved(fns, args.repeats, args.min_time)
            flops = 2 * m * d * d
            row = {"d": d, "tokens": m, "backend": backend, **{f"{k}_ms": 1e3 * v for k, v in t.items()},
                   "fp32_gflops": flops / t["fp32"] / 1e9, "w8a8_gops": flops / t["w8a8"] / 1e9,
                   "gemm_gops": flops / t["gemm"] / 1e9, "speedup": t["fp32"] / t["w8a8"]}
            if "int_mm" in t:
                row["int_mm_speedup"] = t["fp32"] / t["int_mm"]
            rows.append(row)
            print(f"  d={d} tokens={m}: fp32 {row['fp32_ms']:.3f} ms, w8a8 {row['w8a8_ms']:.3f} ms "
                  f"({row['speedup']:.2f}x)", flush=True)
    return rows


def sqnr_rows(args, device="cpu") -> list[dict]:
    """SQNR (dB) of W8A8 / W4A8 / W4A16 (per channel and per group) against the fp32 product."""
    rows = []
    for d in args.dims:
        x, w = llama_like(args.sqnr_tokens, d, seed=7 * d)
        x, w = x.to(device), w.to(device)
        ref = x @ w.t()
        q8, q4c, q4g = quantize_weight(w, 8), quantize_weight(w, 4), quantize_weight(w, 4, args.group_size)
        g = args.group_size
        rows.append({
            "d": d,
            "w8a8": sqnr_db(ref, int8_linear(x, q8.qweight, q8.scale)),
            "w8a16": sqnr_db(ref, int8_linear(x, q8.qweight, q8.scale, act_bits=16)),
            "w4a8_channel": sqnr_db(ref, int4_linear(x, q4c.qweight, q4c.scale)),
            f"w4a8_g{g}": sqnr_db(ref, int4_linear(x, q4g.qweight, q4g.scale, group_size=g)),
            f"w4a16_g{g}": sqnr_db(ref, int4_linear(x, q4g.qweight, q4g.scale, group_size=g, act_bits=16)),
        })
    return rows


def cuda_rows(args) -> list[dict]:
    """On CUDA: Triton W8A8 / W4A16 vs cuBLAS fp16 and torch._int_mm (interleaved medians)."""
    rows = []
    for d in args.dims:
        for m in args.tokens:
            x, w = (t.cuda() for t in llama_like(m, d, seed=d + m))
            xh, wh = x.half(), w.half()
            q8, q4 = quantize_weight(w, 8), quantize_weight(w, 4, args.group_size)
            qx, _ = quantize_act_int8(x)
            mp = max(m, 17)  # torch._int_mm needs M > 16
            qxp = F.pad(qx, (0, 0, 0, mp - m))

            def timed(fn):
                def run():
                    fn()
                    torch.cuda.synchronize()
                return run

            t = interleaved({
                "cublas_fp16": timed(lambda: F.linear(xh, wh)),
                "int_mm": timed(lambda: torch._int_mm(qxp, q8.qweight.t())),
                "triton_w8a8": timed(lambda: int8_linear(xh, q8.qweight, q8.scale)),
                "triton_w4a16": timed(lambda: int4_linear(xh, q4.qweight, q4.scale, group_size=args.group_size,
                                                          act_bits=16)),
            }, args.repeats, args.min_time)
            rows.append({"d": d, "tokens": m, **{f"{k}_us": 1e6 * v for k, v in t.items()}})
    return rows


def plot(rows: list[dict], path: Path) -> None:
    """Speedup of W8A8 over fp32 per token count, one line per d."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for d in sorted({r["d"] for r in rows}):
        pts = [r for r in rows if r["d"] == d]
        ax.plot([r["tokens"] for r in pts], [r["speedup"] for r in pts], marker="o", label=f"d={d}")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens")
    ax.set_ylabel("fp32 time / W8A8 time")
    ax.set_title(f"CPU W8A8 int8_linear vs fp32 F.linear ({rows[0]['backend']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    set_cpu_int8_backend(args.backend)
    torch.manual_seed(0)
    print(f"CPU int8 backend: {cpu_int8_backend()}, {args.threads} threads", flush=True)
    with torch.no_grad():
        rows = cpu_rows(args)
        sq = sqnr_rows(args)
        gpu = cuda_rows(args) if torch.cuda.is_available() else None

    print(f"\nW8A8 `int8_linear` ({rows[0]['backend']}) vs fp32 `F.linear`, x [tokens, d] · W [d, d]ᵀ, CPU, "
          f"{args.threads} threads, medians of {args.repeats} interleaved repeats\n")
    extra = any("int_mm_ms" in r for r in rows)
    print("| d | tokens | fp32 ms | W8A8 ms | speedup | fp32 GFLOP/s | W8A8 GOP/s | int8 GEMM GOP/s |"
          + (" torch._int_mm ms |" if extra else ""))
    print("|---|---|---|---|---|---|---|---|" + ("---|" if extra else ""))
    for r in rows:
        tail = f" {r['int_mm_ms']:.3f} |" if "int_mm_ms" in r else (" – |" if extra else "")
        print(f"| {r['d']} | {r['tokens']} | {r['fp32_ms']:.3f} | {r['w8a8_ms']:.3f} | {r['speedup']:.2f}x | "
              f"{r['fp32_gflops']:.0f} | {r['w8a8_gops']:.0f} | {r['gemm_gops']:.0f} |" + tail)
    keys = [k for k in sq[0] if k != "d"]
    print(f"\nQuantization error vs the fp32 product, SQNR dB (higher is better), {args.sqnr_tokens} tokens\n")
    print("| d | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for r in sq:
        print(f"| {r['d']} | " + " | ".join(f"{r[k]:.1f}" for k in keys) + " |")
    if gpu is None:
        print("\nno CUDA: Triton kernels not timed (they are tested under TRITON_INTERPRET=1)")
    else:
        cols = [k for k in gpu[0] if k.endswith("_us")]
        print(f"\nCUDA ({torch.cuda.get_device_name()}), µs per call, medians\n")
        print("| d | tokens | " + " | ".join(cols) + " |")
        print("|---|---|" + "---|" * len(cols))
        for r in gpu:
            print(f"| {r['d']} | {r['tokens']} | " + " | ".join(f"{r[k]:.1f}" for k in cols) + " |")
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "torch": torch.__version__, "cpu": rows, "sqnr_db": sq, "cuda": gpu}
    from colafx.runtime.device import environment

    record["environment"] = environment(torch.device("cpu"), "fp32")
    (args.out / "kernels.json").write_text(json.dumps(record, indent=2))
    plot(rows, args.out / "kernels.png")
    print(f"\nwrote {args.out / 'kernels.json'} and {args.out / 'kernels.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
