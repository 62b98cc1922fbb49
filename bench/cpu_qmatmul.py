"""Quantized-matmul kernels at LLaMA shapes on the CPU: colafx vs the int8 / int4 paths users pick.

    python bench/cpu_qmatmul.py [--dims 576 1024 2048] [--tokens 1 16 128 512 2048] [--repeats 5]

For every shape ``x [tokens, d] · W [d, d]ᵀ`` the variants are timed interleaved (each repeat runs
all of them once, in a shuffled order) and the median is reported, because the machine is shared;
the ratios against the peers also get their lowest and highest value over the repeats:

* ``fp32``: ``F.linear`` (the reference);
* ``fbgemm``: the peer, PyTorch's dynamic int8 linear (``torch.ao.quantization.quantize_dynamic`` on
  an ``nn.Linear`` = ``torch.ops.quantized.linear_dynamic`` with a prepacked weight);
* ``w8a8``: ``colafx.kernels.int8_linear`` end to end (per-token activation quantization, the int8
  GEMM of the selected CPU backend, fp32 rescale);
* ``w4a8``: ``colafx.kernels.int4_linear``, per-channel int4 weight, int8 activations;
* ``w4a16``: ``int4_linear`` group 32, weight-only, with bf16 activations, and its peer ``aten_int4``:
  ATen's int4 CPU kernel ``_weight_int4pack_mm_for_cpu`` (bf16; its fp32 path is a slow reference);
* ``gemm``: the bare int8×int8→int32 GEMM of that backend (``torch._int_mm`` for ``fbgemm``, whose
  FBGEMM call takes the codes as floats).

Then the in-place ZO perturbation's throughput (weight bytes/s) against MeZO's reference
perturbation (``torch.manual_seed``; ``p.add_(torch.randn_like(p), alpha=eps)``), and the
quantization error (SQNR dB vs the fp32 product) of W8A8 exact, W8A8 with 7-bit activations
(the codes of ``onednn_a7`` / ``fbgemm_a7``, the default on CPUs without VNNI/AMX), FBGEMM, W4A8
and W4A16. On CUDA it times the
Triton kernels against cuBLAS fp16 and ``torch._int_mm`` (else prints "no CUDA").
Prints the CPU's features; writes ``kernels.json`` and ``kernels.png``.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
import warnings
from pathlib import Path

try:
    import resource  # Unix: page-fault counts
except ImportError:  # pragma: no cover
    resource = None

import torch
import torch.nn.functional as F

from colafx.kernels import int4_linear, int8_linear, quantize_act_int8, quantize_weight
from colafx.kernels.qmatmul import (CPU_INT8_BACKENDS, cpu_act_qmax, cpu_int8_backend, exact_cpu_int8_backend,
                                    int8_gemm_cpu, set_cpu_int8_backend, use_cpu_int8_backend)
from colafx.kernels.quant import quantize_tokens
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
    p.add_argument("--backend", choices=CPU_INT8_BACKENDS, default="auto",
                   help="CPU int8 GEMM behind int8_linear (auto: onednn with AMX, fbgemm with AVX512-VNNI, "
                        "else fbgemm_a7)")
    p.add_argument("--int4-max-tokens", type=int, default=512,
                   help="time ATen's int4 kernel and W4A16 up to this many tokens (slow beyond)")
    p.add_argument("--sqnr-tokens", type=int, default=256, help="rows of x for the SQNR table")
    p.add_argument("--group-size", type=int, default=32, help="group size of the int4 weights")
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for kernels.json / .png")
    args = p.parse_args(argv)
    if min(args.dims + args.tokens) < 1 or args.repeats < 1:
        p.error("dims, tokens and repeats must be positive")
    if any(d % args.group_size or d % 2 for d in args.dims):
        p.error(f"every d must be even and divisible by --group-size {args.group_size}")
    return args


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0


def sample(fn, min_time: float, faults: list | None = None) -> float:
    """Seconds per call of ``fn``: loops until ``min_time`` has elapsed (at least one call).
    ``faults``, if given, receives the process's minor page faults per call of the loop."""
    calls, start, faults0 = 0, time.perf_counter(), _minor_faults()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            if faults is not None:
                faults.append((_minor_faults() - faults0) / calls)
            return elapsed / calls


def interleaved(fns: dict, repeats: int, min_time: float, samples: dict | None = None,
                faults: dict | None = None) -> dict:
    """Median seconds per call of each ``fns[name]``, the variants taking turns in every repeat, in
    a new order each time (what ran just before, e.g. what it left to the allocator, moves a large
    call's time by several percent); ``samples``, if given, receives every repeat's seconds, and
    ``faults`` every repeat's page faults per call (a large output page-faulted in anew on every
    call, or not, depending on the heap that earlier calls left: up to ~10% of a call's time)."""
    for fn in fns.values():
        fn()  # warm-up: allocator, and weights are prepacked on their second unchanged use
        fn()
    times = {name: [] for name in fns}
    page_faults = {name: [] for name in fns}
    order = random.Random(0)
    for _ in range(repeats):
        for name in order.sample(list(fns), len(fns)):
            times[name].append(sample(fns[name], min_time, page_faults[name]))
    if samples is not None:
        samples.update(times)
    if faults is not None:
        faults.update(page_faults)
    return {name: statistics.median(t) for name, t in times.items()}


def ratio_range(num: list, den: list) -> list:
    """[min, max] over the repeats of num[i] / den[i]: the spread of a ratio measured side by side."""
    ratios = [a / b for a, b in zip(num, den)]
    return [min(ratios), max(ratios)]


def llama_like(tokens: int, d: int, seed: int):
    """Activations with a few outlier channels (as in LLaMA hidden states) and a 1/√d weight."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d, generator=gen)
    x[:, torch.randperm(d, generator=gen)[: max(1, d // 128)]] *= 8
    w = torch.randn(d, d, generator=gen) / d**0.5
    return x, w


def fbgemm_linear(w: torch.Tensor) -> torch.nn.Module:
    """The peer: what ``torch.ao.quantization.quantize_dynamic`` makes of an ``nn.Linear`` with weight w."""
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data.copy_(w)
    with warnings.catch_warnings():  # torch.ao's deprecation notices, printed once per shape otherwise
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, torch.qint8)[0]


def aten_int4(w: torch.Tensor, group: int):
    """ATen's int4 CPU kernel on bf16 activations (torchao's int4 weight-only layout), group ``group``."""
    q4 = quantize_weight(w, 4, group)
    nibbles = torch.stack((q4.qweight & 0xF, q4.qweight >> 4), -1).reshape(w.shape).to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(nibbles, 2)
    scales = q4.scale.t()
    sz = torch.stack((scales, torch.zeros_like(scales)), -1).bfloat16().contiguous()
    return lambda xb: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, group, sz)


def cpu_rows(args) -> list[dict]:
    """Interleaved timings of fp32, the FBGEMM peer, colafx W8A8 / W4A8 / W4A16 and ATen int4."""
    rows = []
    backend = cpu_int8_backend()
    for d in args.dims:
        for m in args.tokens:
            x, w = llama_like(m, d, seed=d + m)
            xb = x.bfloat16()
            qw, q4, q4g = quantize_weight(w, 8), quantize_weight(w, 4), quantize_weight(w, 4, args.group_size)
            qx, _ = quantize_tokens(x, cpu_act_qmax())  # the codes int8_linear feeds this backend
            peer, int4_peer = fbgemm_linear(w), aten_int4(w, args.group_size)
            g = args.group_size
            fns = {"fp32": lambda: F.linear(x, w),
                   "fbgemm": lambda: peer(x),
                   "w8a8": lambda: int8_linear(x, qw.qweight, qw.scale),
                   "w4a8": lambda: int4_linear(x, q4.qweight, q4.scale),
                   "gemm": lambda: int8_gemm_cpu(qx, qw.qweight, cache_key=qw.qweight, w_scale=qw.scale)}
            if m <= args.int4_max_tokens:  # ATen's int4 kernel is a decode kernel: seconds per call beyond
                fns["aten_int4"] = lambda: int4_peer(xb)
                fns["w4a16"] = lambda: int4_linear(xb, q4g.qweight, q4g.scale, group_size=g, act_bits=16)
            per_repeat: dict = {}
            faults: dict = {}
            t = interleaved(fns, args.repeats, args.min_time, per_repeat, faults)
            flops = 2 * m * d * d
            row = {"d": d, "tokens": m, "backend": backend, **{f"{k}_ms": 1e3 * v for k, v in t.items()},
                   "fp32_gflops": flops / t["fp32"] / 1e9, "w8a8_gops": flops / t["w8a8"] / 1e9,
                   "gemm_gops": flops / t["gemm"] / 1e9, "speedup": t["fp32"] / t["w8a8"],
                   "vs_fbgemm": t["fbgemm"] / t["w8a8"],
                   "vs_fbgemm_range": ratio_range(per_repeat["fbgemm"], per_repeat["w8a8"]),
                   "fbgemm_speedup": t["fp32"] / t["fbgemm"],
                   "w4a8_speedup": t["fp32"] / t["w4a8"],
                   "page_faults_per_call": {k: [round(f) for f in v] for k, v in faults.items()}}
            if "w4a16" in t:
                row.update(w4a16_vs_aten=t["aten_int4"] / t["w4a16"], w4a16_speedup=t["fp32"] / t["w4a16"],
                           w4a16_speedup_range=ratio_range(per_repeat["fp32"], per_repeat["w4a16"]))
            rows.append(row)
            print(f"  d={d} tokens={m}: fp32 {row['fp32_ms']:.3f} ms, fbgemm {row['fbgemm_ms']:.3f} ms, "
                  f"w8a8 {row['w8a8_ms']:.3f} ms ({row['vs_fbgemm']:.2f}x fbgemm)", flush=True)
    return rows


def zo_rows(args) -> list[dict]:
    """In-place ZO perturbation throughput (weight bytes/s) on a [3d, d] weight vs MeZO's reference."""
    from colafx.kernels import zo_perturb_, zo_perturb_int_
    from colafx.kernels.zo import ZO_QMAX

    rows = []
    for d in args.dims:
        w = torch.randn(3 * d, d) / d**0.5
        w_ref = w.clone()
        q8, q4 = quantize_weight(w, 8, qmax=ZO_QMAX[8]), quantize_weight(w, 4, qmax=ZO_QMAX[4])

        def mezo_reference():  # MeZO's released code: torch.manual_seed(seed); z = torch.normal(...)
            torch.manual_seed(1)
            w_ref.add_(torch.normal(0, 1, size=w_ref.shape), alpha=1e-3)

        t = interleaved({"mezo_reference": mezo_reference,
                         "fp32": lambda: zo_perturb_(w, 1, 1e-3),
                         "int8": lambda: zo_perturb_int_(q8.qweight, q8.scale, 1, 1e-3, 1, 8),
                         "int4": lambda: zo_perturb_int_(q4.qweight, q4.scale, 1, 1e-3, 1, 4)},
                        args.repeats, args.min_time)
        nbytes = {"mezo_reference": w.nbytes, "fp32": w.nbytes, "int8": q8.qweight.nbytes, "int4": q4.qweight.nbytes}
        for name, sec in t.items():
            rows.append({"d": d, "weight": f"[{3 * d}, {d}]", "variant": name, "ms": 1e3 * sec,
                         "weight_gb_s": nbytes[name] / sec / 1e9, "melem_s": w.numel() / sec / 1e6})
    return rows


def sqnr_rows(args, device="cpu") -> list[dict]:
    """SQNR (dB) against the fp32 product of W8A8 (exact and 7-bit activations), the FBGEMM peer,
    W8A16, W4A8 and W4A16 (per channel and per group)."""
    rows = []
    for d in args.dims:
        x, w = llama_like(args.sqnr_tokens, d, seed=7 * d)
        x, w = x.to(device), w.to(device)
        ref = x @ w.t()
        q8, q4c, q4g = quantize_weight(w, 8), quantize_weight(w, 4), quantize_weight(w, 4, args.group_size)
        g = args.group_size
        if device == "cpu":  # exact W8A8 (8-bit codes) and the 7-bit form, whatever the default
            with use_cpu_int8_backend(exact_cpu_int8_backend()):
                row = {"d": d, "w8a8": sqnr_db(ref, int8_linear(x, q8.qweight, q8.scale))}
            with use_cpu_int8_backend("onednn_a7"):
                row["w8a8_a7"] = sqnr_db(ref, int8_linear(x, q8.qweight, q8.scale))
            row["fbgemm"] = sqnr_db(ref, fbgemm_linear(w)(x))
        else:
            row = {"d": d, "w8a8": sqnr_db(ref, int8_linear(x, q8.qweight, q8.scale))}
        row.update({
            "w8a16": sqnr_db(ref, int8_linear(x, q8.qweight, q8.scale, act_bits=16)),
            "w4a8_channel": sqnr_db(ref, int4_linear(x, q4c.qweight, q4c.scale)),
            f"w4a8_g{g}": sqnr_db(ref, int4_linear(x, q4g.qweight, q4g.scale, group_size=g)),
            f"w4a16_g{g}": sqnr_db(ref, int4_linear(x, q4g.qweight, q4g.scale, group_size=g, act_bits=16)),
        })
        rows.append(row)
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


def plot(rows: list[dict], path) -> None:
    """W8A8 time relative to the FBGEMM peer and to fp32 per token count, one line per d."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, key, label in ((axes[0], "vs_fbgemm", "FBGEMM time / W8A8 time"),
                           (axes[1], "speedup", "fp32 time / W8A8 time")):
        for d in sorted({r["d"] for r in rows}):
            pts = [r for r in rows if r["d"] == d]
            ax.plot([r["tokens"] for r in pts], [r[key] for r in pts], marker="o", label=f"d={d}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(f"CPU W8A8 int8_linear ({rows[0]['backend']}) vs FBGEMM dynamic int8 and fp32 F.linear")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)


def _spread(bounds: list) -> str:
    return f"({bounds[0]:.2f}–{bounds[1]:.2f})"


def print_tables(args, rows, zo, sq, gpu, features) -> None:
    """The Markdown tables of one run."""
    print(f"\nCPU features: {' '.join(features) or 'unknown'}; int8 backend {rows[0]['backend']}; "
          f"quantized engine {torch.backends.quantized.engine}; {args.threads} thread(s); medians of "
          f"{args.repeats} interleaved repeats in shuffled order (in brackets: the lowest and highest ratio of one repeat)\n")
    print("| d | tokens | fp32 ms | FBGEMM ms | W8A8 ms | W8A8 vs FBGEMM | W8A8 vs fp32 | W4A8 ms | W4A8 vs fp32 "
          f"| ATen int4 bf16 ms | W4A16 g{args.group_size} bf16 ms | W4A16 vs ATen | W4A16 vs fp32 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['d']} | {r['tokens']} | {r['fp32_ms']:.3f} | {r['fbgemm_ms']:.3f} | {r['w8a8_ms']:.3f} | "
              f"{r['vs_fbgemm']:.2f}x {_spread(r['vs_fbgemm_range'])} | {r['speedup']:.2f}x | {r['w4a8_ms']:.3f} | "
              f"{r['w4a8_speedup']:.2f}x | "
              + (f"{r['aten_int4_ms']:.3f} | {r['w4a16_ms']:.3f} | {r['w4a16_vs_aten']:.2f}x | "
                 f"{r['w4a16_speedup']:.2f}x {_spread(r['w4a16_speedup_range'])} |"
                 if "w4a16_ms" in r else "– | – | – | – |"))
    faulted = [f"d {r['d']} x {r['tokens']}: " + ", ".join(f"{k} {statistics.median(v):.0f}" for k, v in
                                                          r["page_faults_per_call"].items() if statistics.median(v) > 10)
               for r in rows if any(statistics.median(v) > 10 for v in r["page_faults_per_call"].values())]
    print("\nPage faults per call (median over the repeats) above 10: " + ("; ".join(faulted) or "none"))
    print("\nIn-place ZO perturbation of one [3d, d] weight (+ε·u), weight bytes/s and elements/s\n")
    print("| d | weight | variant | ms | weight GB/s | M elements/s |")
    print("|---|---|---|---|---|---|")
    for r in zo:
        print(f"| {r['d']} | {r['weight']} | {r['variant']} | {r['ms']:.2f} | {r['weight_gb_s']:.2f} | {r['melem_s']:.0f} |")
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


def main(argv=None) -> int:
    from colafx.files import atomic_write_bytes, atomic_write_json
    from colafx.runtime.device import cpu_features, environment, isa_limits

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    set_cpu_int8_backend(args.backend)
    torch.manual_seed(0)
    features = cpu_features() + [f"{k}={v}" for k, v in isa_limits().items()]  # ISA limits: kernels of that ISA
    print(f"CPU features: {' '.join(features) or 'unknown'}; int8 backend {cpu_int8_backend()}, "
          f"{args.threads} threads", flush=True)
    with torch.no_grad():
        rows = cpu_rows(args)
        zo = zo_rows(args)
        sq = sqnr_rows(args)
        gpu = cuda_rows(args) if torch.cuda.is_available() else None
    print_tables(args, rows, zo, sq, gpu, features)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "torch": torch.__version__, "cpu": rows, "zo_perturb": zo, "sqnr_db": sq, "cuda": gpu,
              "environment": environment(torch.device("cpu"), "fp32")}
    atomic_write_json(args.out / "kernels.json", record)
    atomic_write_bytes(args.out / "kernels.png", lambda tmp: plot(rows, tmp))
    print(f"\nwrote {args.out / 'kernels.json'} and {args.out / 'kernels.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
