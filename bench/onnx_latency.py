"""onnxruntime CPU latency and file size of SmolLM2-135M exports: dense fp32, CoLA fp32, int8, int4.

int8 and int4 keep the logits head in fp32; int8-head and int4-head quantize it too (untied from
the embedding, which stays fp32).

Each variant is exported with ``colafx.export_onnx`` (KV cache), checked for greedy-token parity with
PyTorch ``generate``, then timed side by side: the variants are interleaved in every repeat and the
median is reported (the machine is shared). Prefill = one call on ``--prefill`` tokens; decode = the
median time of one-token calls with the cache of that prefill. Prints a Markdown table and writes
``onnx_latency.json`` + ``onnx_latency.png`` to ``--out``.

Example: ``python bench/onnx_latency.py --repeats 5``
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import colafx
from colafx.runtime.export import OnnxCausalLM, export_onnx, quantize_for_export
from colafx.runtime.models import load_model, load_tokenizer
from colafx.files import atomic_write_bytes, atomic_write_json
from colafx.runtime.device import environment

VARIANTS = ("dense", "cola", "int8", "int8-head", "int4", "int4-head")
PROMPT = "The capital of France is"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2", help="model to export (a path load_model accepts, or 'smollm2')")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                   help="dense: fp32 as loaded; cola: colaified (SVD init) fp32; int8: W8A8 per channel "
                        "(MatMulInteger); int4: W4A8 groups of 32 (MatMulNBits, accuracy_level 4); "
                        "-head: the logits head quantized too")
    p.add_argument("--rank", type=float, default=0.25, help="CoLA rank of the cola variant, fraction of d_model")
    p.add_argument("--prefill", type=int, default=128, help="prompt tokens of the timed prefill")
    p.add_argument("--decode", type=int, default=16, help="one-token decode calls timed per repeat")
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats (medians are reported)")
    p.add_argument("--threads", type=int, default=1,
                   help="onnxruntime intra-op threads (1: on a shared 2-core machine a second spinning "
                        "thread mostly measures the scheduler)")
    p.add_argument("--parity-tokens", type=int, default=16, help="greedy tokens compared with PyTorch generate")
    p.add_argument("--export-dir", default=None, help="keep the exports here (default: a temporary folder)")
    p.add_argument("--reuse", action="store_true",
                   help="with --export-dir: time an export already there instead of exporting again "
                        "(export_s is then null)")
    p.add_argument("--out", default="bench/results", help="folder for onnx_latency.json / .png")
    args = p.parse_args(argv)
    if args.reuse and not args.export_dir:
        p.error("--reuse needs --export-dir")
    return args


def build_variant(base: torch.nn.Module, name: str, rank: float) -> torch.nn.Module:
    """A copy of ``base`` prepared for the variant ``name``."""
    model = copy.deepcopy(base)
    if name == "cola":
        colafx.colaify(model, rank=rank, init="svd")
    elif name.startswith("int"):
        quantize_for_export(model, name[:4], head=name.endswith("-head"))
    return model.eval()


def file_bytes(path: Path) -> int:
    """Size of an .onnx file plus its external data, if any."""
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def time_once(lm: OnnxCausalLM, prompt: np.ndarray, decode: int) -> tuple[float, float]:
    """(prefill seconds, median one-token decode seconds)."""
    start = time.perf_counter()
    logits, past = lm.forward(prompt)
    prefill = time.perf_counter() - start
    token = logits[:, -1:].argmax(-1)
    steps = []
    for _ in range(decode):
        start = time.perf_counter()
        logits, past = lm.forward(token, past)
        steps.append(time.perf_counter() - start)
        token = logits[:, -1:].argmax(-1)
    return prefill, statistics.median(steps)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for ax, key, label in zip(axes, ("file_mib", "prefill_ms", "decode_ms"),
                              ("file size (MiB)", f"prefill {rows[0]['prefill_tokens']} tokens (ms)",
                               "decode (ms / token)")):
        ax.bar(names, [r[key] for r in rows], color="tab:blue")
        ax.set_title(label)
    fig.suptitle("SmolLM2-135M, onnxruntime CPU")
    fig.tight_layout()
    atomic_write_bytes(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    base, tokenizer = load_model(args.model), load_tokenizer(args.model)
    prompt_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    folder = Path(args.export_dir or tempfile.mkdtemp(prefix="onnx_latency."))
    rows, sessions = [], {}
    for name in tqdm(args.variants, desc="export + parity"):
        model = build_variant(base, name, args.rank)
        path, export_s = folder / name / "model.onnx", None
        if not (args.reuse and path.is_file() and path.with_suffix(".json").is_file()):
            start = time.perf_counter()
            export_onnx(model, path, quant=name[:4] if name.startswith("int") else None)
            export_s = time.perf_counter() - start
        lm = sessions[name] = OnnxCausalLM(path, threads=args.threads)
        expected = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids),
                                  max_new_tokens=args.parity_tokens, do_sample=False)
        got = lm.generate(prompt_ids, max_new_tokens=args.parity_tokens)
        rows.append({"variant": name, "file_mib": file_bytes(path) / 2**20, "export_s": export_s,
                     "greedy_match": bool(torch.equal(got, expected)),
                     "text": tokenizer.decode(got[0, prompt_ids.shape[1]:])})
        del model
    vocab = base.config.vocab_size
    prompt = np.random.default_rng(0).integers(0, vocab, (1, args.prefill), dtype=np.int64)
    timings = {name: ([], []) for name in args.variants}
    for name in args.variants:  # warm-up
        time_once(sessions[name], prompt, 2)
    for _ in tqdm(range(args.repeats), desc="timing (interleaved)"):
        for name in args.variants:
            prefill, decode = time_once(sessions[name], prompt, args.decode)
            timings[name][0].append(prefill)
            timings[name][1].append(decode)
    ref = rows[0]
    for row in rows:
        row.update(prefill_tokens=args.prefill, prefill_ms=1e3 * statistics.median(timings[row["variant"]][0]),
                   decode_ms=1e3 * statistics.median(timings[row["variant"]][1]))
    for row in rows:
        row["size_vs_first"] = row["file_mib"] / ref["file_mib"]
        row["decode_vs_first"] = row["decode_ms"] / ref["decode_ms"]
        row["prefill_vs_first"] = row["prefill_ms"] / ref["prefill_ms"]
    print(f"\nSmolLM2-135M ONNX, onnxruntime CPU, {args.threads} threads, medians of {args.repeats} interleaved "
          f"repeats (ratios vs {ref['variant']})\n")
    print("| variant | file MiB | size ratio | prefill ms (128 tok) | prefill ratio | decode ms/token | "
          "decode ratio | greedy = PyTorch |".replace("128", str(args.prefill)))
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['file_mib']:.1f} | {r['size_vs_first']:.2f}x | {r['prefill_ms']:.1f} | "
              f"{r['prefill_vs_first']:.2f}x | {r['decode_ms']:.2f} | {r['decode_vs_first']:.2f}x | "
              f"{'yes' if r['greedy_match'] else 'no'} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "onnx_latency.json", {"args": vars(args), "rows": rows,
                                                   "environment": environment(torch.device("cpu"), "fp32")})
    plot(rows, out / "onnx_latency.png")
    print(f"\nwrote {out / 'onnx_latency.json'} and {out / 'onnx_latency.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
