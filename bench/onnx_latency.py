"""onnxruntime CPU latency, file size and accuracy of SmolLM2-135M exports: colafx's against
onnxruntime's own quantizers applied to the same fp32 export.

colafx variants (``colafx.export_onnx``, KV cache): dense fp32, cola (CoLA fp32), int8 / int4
(fp32 logits head), int8-head / int4-head (head quantized too, untied from the embedding, which
stays fp32), int4-head-asym (asymmetric int4, ``--asymmetric``: onnxruntime's int4 grid with a zero
point per block, which MatMulNBits reads), int4-head-asym-gptq (the same format with GPTQ weights,
``--gptq``, calibrated on ``--calibration-tokens`` tokens of WikiText-2 *train*, held out from the
test text the accuracy is measured on), int4-head-asym-gptq-g64 (the same with a scale and zero point
per 64 input columns, ``--group-size 64``: fewer bytes per token). Quantized linears are onnxruntime's fused ``com.microsoft::MatMulNBits`` (the default
``onnx_ops="contrib"``); a ``-std`` suffix exports them with standard ai.onnx operators instead
(int8: the op's exact per-token quantization + ``MatMulInteger``, ~14 nodes per linear), a ``-vnni``
suffix with ``onnx_ops="contrib-vnni"`` (int8: the op's per-token codes through
``MatMulIntegerToFloat``, onnxruntime's u8·s8 GEMM; for CPUs with VNNI / AMX, like ort-s8-pc).

onnxruntime peers, on the dense export after ``quant_pre_process`` (so the tied head becomes a
MatMul with a constant weight and is quantized too): ``quantize_dynamic`` on MatMul with QUInt8
weights (ort-u8), QUInt8 + ``reduce_range`` (ort-u8-rr), QInt8 per channel (ort-s8-pc); and
``MatMulNBitsQuantizer`` int4, block 32, asymmetric, accuracy_level 4 (ort-int4), and the same with
block 64 (ort-int4-b64), the same-block peer of the -g64 variant. The ``-fp32head`` int8 peers
leave the head MatMul in fp32 (``nodes_to_exclude``), the like-for-like peers of colafx's int8 rows
without ``-head``; pairings pair rows with the same head treatment (int4: block 32 with block 32; the
-g64 variant with both int4 peers).

Accuracy is measured against the **fp32** model on real text (WikiText-2 test, ``--eval-tokens`` in
windows of ``--eval-window``): mean |Δlogit| and top-1 agreement with the dense fp32 export, and
perplexity; colafx variants are also compared with their own PyTorch model (max |Δlogit|) and
checked for greedy-token parity with PyTorch ``generate``. Timing: every variant is timed in every
repeat, interleaved, and medians are reported, as wall-clock time and as the thread's CPU time (on a
shared machine the scheduler's share inflates wall-clock time; pairings compare CPU time). Prefill =
one call on ``--prefill`` tokens; decode = the median one-token call with the cache of that prefill. Prints the
CPU's features and Markdown tables; writes ``onnx_latency.json`` + ``onnx_latency.png`` to ``--out``.

Example: ``python bench/onnx_latency.py --export-dir /tmp/onnx --repeats 5``
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import colafx
from colafx.files import atomic_write_bytes, atomic_write_json
from colafx.runtime.device import cpu_features, environment
from colafx.runtime.export import OnnxCausalLM, export_onnx, meta_path, onnxruntime_u8s8_exact, quantize_for_export
from colafx.runtime.data import calibration_ids
from colafx.runtime.models import load_model, load_tokenizer

COLAFX = ("dense", "cola", "int8", "int8-head", "int4", "int4-head", "int4-head-asym", "int4-head-asym-gptq",
          "int4-head-asym-gptq-g64", "int8-std", "int8-head-std", "int4-head-std", "int8-vnni", "int8-head-vnni")
ONNX_OPS_SUFFIX = {"-std": "standard", "-vnni": "contrib-vnni"}
ORT_INT8 = ("ort-u8", "ort-u8-rr", "ort-s8-pc")
ORT = (*ORT_INT8, *(f"{n}-fp32head" for n in ORT_INT8), "ort-int4", "ort-int4-b64")
VARIANTS = COLAFX + ORT
DEFAULT = ("dense", "int8", "int8-head", "int8-head-std", *(("int8-head-vnni",) if onnxruntime_u8s8_exact() else ()),
           "int4-head", "int4-head-asym", "int4-head-asym-gptq", "int4-head-asym-gptq-g64", *ORT)
PROMPT = "The capital of France is"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2", help="model to export (a path load_model accepts, or 'smollm2')")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(DEFAULT),
                   help="dense: fp32 as loaded (always run: the accuracy reference and the peers' input); "
                        "cola: colaified (SVD init) fp32; int8: W8A8 per channel; int4: W4A8 groups of 32; "
                        "-head: the logits head quantized too; -std: standard ai.onnx operators instead of "
                        "com.microsoft MatMulNBits; -vnni: MatMulIntegerToFloat (CPUs with VNNI / AMX); ort-*: onnxruntime's quantizers on the dense export")
    p.add_argument("--rank", type=float, default=0.25, help="CoLA rank of the cola variant, fraction of d_model")
    p.add_argument("--prefill", type=int, default=128, help="prompt tokens of the timed prefill")
    p.add_argument("--decode", type=int, default=16, help="one-token decode calls timed per repeat")
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats (medians are reported)")
    p.add_argument("--threads", type=int, default=1,
                   help="onnxruntime intra-op threads (1: on a shared 2-core machine a second spinning "
                        "thread mostly measures the scheduler)")
    p.add_argument("--parity-tokens", type=int, default=16, help="greedy tokens compared with PyTorch generate")
    p.add_argument("--data-dir", default=os.environ.get("COLAFX_DATA", "../shared/data"),
                   help="folder with wikitext-2/test.txt (the accuracy text)")
    p.add_argument("--eval-tokens", type=int, default=1024, help="WikiText-2 test tokens scored for accuracy")
    p.add_argument("--eval-window", type=int, default=256, help="tokens per scored window (one prefill each)")
    p.add_argument("--calibration-tokens", type=int, default=8192,
                   help="WikiText-2 train tokens that calibrate the -gptq variants")
    p.add_argument("--export-dir", default=None, help="keep the exports here (default: a temporary folder)")
    p.add_argument("--reuse", action="store_true",
                   help="with --export-dir: use an export already there instead of exporting again "
                        "(export_s is then null)")
    p.add_argument("--out", default="bench/results", help="folder for onnx_latency.json / .png")
    args = p.parse_args(argv)
    if args.reuse and not args.export_dir:
        p.error("--reuse needs --export-dir")
    text = Path(args.data_dir) / "wikitext-2" / "test.txt"
    if not text.is_file():
        p.error(f"{text} not found: pass --data-dir (or set COLAFX_DATA) to the folder holding wikitext-2/")
    if "dense" not in args.variants:
        args.variants.insert(0, "dense")
    return args


def build_variant(base: torch.nn.Module, name: str, rank: float, calibration=None) -> torch.nn.Module:
    """A copy of ``base`` prepared for the colafx variant ``name`` (``calibration``: token ids for
    the -gptq variants)."""
    model = copy.deepcopy(base)
    if name == "cola":
        colafx.colaify(model, rank=rank, init="svd")
    elif name.startswith("int"):
        quantize_for_export(model, name[:4], head="-head" in name, symmetric="-asym" not in name,
                            calibration=calibration if "-gptq" in name else None,
                            group_size=64 if name.endswith("-g64") else None)
    return model.eval()


def ort_quantize(name: str, dense: Path, folder: Path) -> Path:
    """Quantize the dense export with onnxruntime's own tools; the graph's inputs / outputs are kept,
    so the dense export's .json is copied beside it for :class:`OnnxCausalLM`."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    from onnxruntime.quantization.shape_inference import quant_pre_process

    logging.disable(logging.INFO)  # the quantizers log every tensor they skip at INFO
    pre = folder / "pre" / "model.onnx"
    if not pre.is_file():  # symbolic shape inference does not finish on this graph; ONNX's does
        pre.parent.mkdir(parents=True, exist_ok=True)
        quant_pre_process(str(dense), str(pre), skip_symbolic_shape=True)
    path = folder / name / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    if name.startswith("ort-int4"):
        quantizer = MatMulNBitsQuantizer(onnx.load(str(pre)), bits=4, block_size=64 if name.endswith("-b64") else 32,
                                         is_symmetric=False, accuracy_level=4)
        quantizer.process()
        quantizer.model.save_model_to_file(str(path), False)
    else:
        options = {"ort-u8": dict(weight_type=QuantType.QUInt8),
                   "ort-u8-rr": dict(weight_type=QuantType.QUInt8, reduce_range=True),
                   "ort-s8-pc": dict(weight_type=QuantType.QInt8, per_channel=True)}[name.removesuffix("-fp32head")]
        if name.endswith("-fp32head"):  # the MatMul that writes the logits output stays fp32
            graph = onnx.load(str(pre), load_external_data=False).graph
            options["nodes_to_exclude"] = [n.name for n in graph.node if graph.output[0].name in n.output]
        quantize_dynamic(str(pre), str(path), op_types_to_quantize=["MatMul"], **options)
    meta = json.loads(meta_path(dense).read_text())
    meta.update(quant=name, onnx_ops="onnxruntime.quantization", tokenizer=None)
    meta_path(path).write_text(json.dumps(meta))
    return path


def file_bytes(path: Path) -> int:
    """Size of an .onnx file plus its external data, if any."""
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def time_once(lm: OnnxCausalLM, prompt: np.ndarray, decode: int) -> dict:
    """Prefill seconds and the median one-token decode seconds, each as wall-clock time and as the
    CPU time of this thread (onnxruntime runs a 1-thread session on the calling thread, so the
    CPU time leaves out the time a shared machine's scheduler takes the core away)."""
    wall, cpu = time.perf_counter(), time.thread_time()
    logits, past = lm.forward(prompt)
    out = {"prefill": time.perf_counter() - wall, "prefill_cpu": time.thread_time() - cpu}
    token = logits[:, -1:].argmax(-1)
    steps, cpu_steps = [], []
    for _ in range(decode):
        wall, cpu = time.perf_counter(), time.thread_time()
        logits, past = lm.forward(token, past)
        steps.append(time.perf_counter() - wall)
        cpu_steps.append(time.thread_time() - cpu)
        token = logits[:, -1:].argmax(-1)
    return {**out, "decode": statistics.median(steps), "decode_cpu": statistics.median(cpu_steps)}


def eval_windows(tokenizer, data_dir: str, tokens: int, window: int) -> list[np.ndarray]:
    """The first ``tokens`` tokens of WikiText-2 test as [1, window] arrays."""
    text = (Path(data_dir) / "wikitext-2" / "test.txt").read_text(encoding="utf-8")[: 20 * tokens]
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"][:tokens], dtype=np.int64)
    return [ids[None, i:i + window] for i in range(0, len(ids) - window + 1, window)]


def accuracy(lm: OnnxCausalLM, windows, reference: list[np.ndarray] | None, model=None) -> dict:
    """Mean |Δlogit| and top-1 agreement against ``reference`` logits (the fp32 model; None: this
    model is the reference), perplexity, and (``model``: the variant's PyTorch model) the max and
    mean |Δlogit| against it. Returns (scores, logits)."""
    logits = [lm.forward(w)[0][0].astype(np.float32) for w in windows]
    reference = logits if reference is None else reference
    nll = []
    for w, out in zip(windows, logits):
        shifted = out[:-1] - out[:-1].max(-1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        nll.append(-logp[np.arange(len(w[0]) - 1), w[0, 1:]])
    row = {"ppl": float(np.exp(np.concatenate(nll).mean()))}
    row["mean_abs_dlogit_vs_fp32"] = float(np.mean([np.abs(a - b).mean() for a, b in zip(logits, reference)]))
    row["top1_vs_fp32"] = float(np.mean([(a.argmax(-1) == b.argmax(-1)).mean() for a, b in zip(logits, reference)]))
    if model is not None:
        with torch.no_grad():
            own = [model(input_ids=torch.from_numpy(w)).logits[0].float().numpy() for w in windows]
        row["max_abs_dlogit_vs_pytorch"] = float(max(np.abs(a - b).max() for a, b in zip(logits, own)))
        row["mean_abs_dlogit_vs_pytorch"] = float(np.mean([np.abs(a - b).mean() for a, b in zip(logits, own)]))
    return row, logits


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in rows]
    colors = ["tab:orange" if n.startswith("ort") else "tab:blue" for n in names]
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    for ax, key, label in zip(axes, ("file_mib", "prefill_cpu_ms", "decode_cpu_ms", "top1_vs_fp32"),
                              ("file size (MiB)", f"prefill {rows[0]['prefill_tokens']} tokens (CPU ms)",
                               "decode (CPU ms / token)", "top-1 agreement with fp32")):
        ax.bar(names, [r[key] for r in rows], color=colors)
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=60)
    fig.suptitle("SmolLM2-135M, onnxruntime CPU (blue: colafx, orange: onnxruntime quantizers)")
    fig.tight_layout()
    atomic_write_bytes(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def peers_of(variant: str) -> tuple[str, ...]:
    """The onnxruntime rows a colafx variant is compared with: the same bits and the same head
    treatment (int8 with a quantized head: ORT's int8 rows, which quantize the head; int8 with the
    fp32 head: the -fp32head rows; int4 with a quantized head: ort-int4, block 32, and for the -g64
    variant also ort-int4-b64, its block)."""
    if variant.startswith("int4") and "-head" in variant:
        return ("ort-int4", "ort-int4-b64") if variant.endswith("-g64") else ("ort-int4",)
    if variant.startswith("int8"):
        return ORT_INT8 if "-head" in variant else tuple(f"{n}-fp32head" for n in ORT_INT8)
    return ()


def pairings(rows: list[dict]) -> list[dict]:
    """colafx rows against their like-for-like onnxruntime rows (:func:`peers_of`): decode and
    prefill ratios, wall-clock and CPU time (colafx / onnxruntime; < 1 = colafx faster), and the
    top-1 lead in points."""
    by_name = {r["variant"]: r for r in rows}
    out = []
    for mine in rows:
        for peer in [n for n in peers_of(mine["variant"]) if n in by_name]:
            other = by_name[peer]
            out.append({"colafx": mine["variant"], "onnxruntime": peer,
                        "decode_ratio": mine["decode_ms"] / other["decode_ms"],
                        "decode_cpu_ratio": mine["decode_cpu_ms"] / other["decode_cpu_ms"],
                        "prefill_ratio": mine["prefill_ms"] / other["prefill_ms"],
                        "prefill_cpu_ratio": mine["prefill_cpu_ms"] / other["prefill_cpu_ms"],
                        "top1_lead_points": 100 * (mine["top1_vs_fp32"] - other["top1_vs_fp32"])})
    return out


def print_tables(args, rows: list[dict], pairs: list[dict], features: list[str]) -> None:
    ref = rows[0]
    print(f"\nSmolLM2-135M ONNX, onnxruntime CPU, {args.threads} thread(s), medians of {args.repeats} "
          f"interleaved repeats; CPU features: {' '.join(features) or 'unknown'}")
    print(f"accuracy on {args.eval_tokens} WikiText-2 test tokens (windows of {args.eval_window}) against "
          f"the fp32 export; ratios vs {ref['variant']}\n")
    print(f"| variant | file MiB | prefill ms ({args.prefill} tok) wall / CPU | decode ms/token wall / CPU | "
          "decode CPU ratio | mean abs Δlogit vs fp32 | top-1 = fp32 | ppl | max abs Δlogit vs own PyTorch | "
          "greedy = PyTorch |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        own = r.get("max_abs_dlogit_vs_pytorch")
        greedy = r.get("greedy_match")
        print(f"| {r['variant']} | {r['file_mib']:.1f} | {r['prefill_ms']:.0f} / {r['prefill_cpu_ms']:.0f} | "
              f"{r['decode_ms']:.2f} / {r['decode_cpu_ms']:.2f} | {r['decode_cpu_ms'] / ref['decode_cpu_ms']:.2f}x | "
              f"{r['mean_abs_dlogit_vs_fp32']:.3f} | {100 * r['top1_vs_fp32']:.1f}% | {r['ppl']:.2f} | "
              f"{'—' if own is None else f'{own:.3f}'} | {'—' if greedy is None else ('yes' if greedy else 'no')} |")
    if pairs:
        print("\n| colafx | onnxruntime | decode ratio CPU (wall) | prefill ratio CPU (wall) | top-1 lead (points) |")
        print("|---|---|---|---|---|")
        for p in pairs:
            print(f"| {p['colafx']} | {p['onnxruntime']} | {p['decode_cpu_ratio']:.3f}x ({p['decode_ratio']:.3f}x) | "
                  f"{p['prefill_cpu_ratio']:.2f}x ({p['prefill_ratio']:.2f}x) | {p['top1_lead_points']:+.1f} |")


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    features = cpu_features()
    print(f"CPU features: {' '.join(features) or 'unknown'}", flush=True)
    base, tokenizer = load_model(args.model), load_tokenizer(args.model)
    prompt_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    windows = eval_windows(tokenizer, args.data_dir, args.eval_tokens, args.eval_window)
    folder = Path(args.export_dir or tempfile.mkdtemp(prefix="onnx_latency."))
    names = [n for n in VARIANTS if n in args.variants]  # dense first, the peers last
    rows, sessions, reference = [], {}, None
    for name in tqdm(names, desc="export + accuracy"):
        path, export_s, model = folder / name / "model.onnx", None, None
        if name in COLAFX:
            calibration = None
            if "-gptq" in name:
                calibration = calibration_ids(Path(args.data_dir) / "wikitext-2" / "train.txt", tokenizer,
                                              args.calibration_tokens)
            model = build_variant(base, name, args.rank, calibration)
        if not (args.reuse and path.is_file() and meta_path(path).is_file()):
            start = time.perf_counter()
            if name in COLAFX:
                export_onnx(model, path, quant=name[:4] if name.startswith("int") else None,
                            onnx_ops=next((o for suffix, o in ONNX_OPS_SUFFIX.items() if name.endswith(suffix)),
                                          "contrib"))
            else:
                ort_quantize(name, folder / "dense" / "model.onnx", folder)
            export_s = time.perf_counter() - start
        lm = sessions[name] = OnnxCausalLM(path, threads=args.threads)
        row = {"variant": name, "file_mib": file_bytes(path) / 2**20, "export_s": export_s}
        scores, logits = accuracy(lm, windows, reference, model)
        reference = logits if reference is None else reference
        row.update(scores)
        if model is not None:
            expected = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids),
                                      max_new_tokens=args.parity_tokens, do_sample=False)
            got = lm.generate(prompt_ids, max_new_tokens=args.parity_tokens)
            row.update(greedy_match=bool(torch.equal(got, expected)),
                       text=tokenizer.decode(got[0, prompt_ids.shape[1]:]))
        rows.append(row)
        del model
    prompt = np.random.default_rng(0).integers(0, base.config.vocab_size, (1, args.prefill), dtype=np.int64)
    timings = {name: [] for name in names}
    for name in names:  # warm-up
        time_once(sessions[name], prompt, 2)
    for _ in tqdm(range(args.repeats), desc="timing (interleaved)"):
        for name in names:
            timings[name].append(time_once(sessions[name], prompt, args.decode))
    for row in rows:
        runs = timings[row["variant"]]
        row["prefill_tokens"] = args.prefill
        for key in ("prefill", "prefill_cpu", "decode", "decode_cpu"):
            row[f"{key}_ms"] = 1e3 * statistics.median(r[key] for r in runs)
    pairs = pairings(rows)
    print_tables(args, rows, pairs, features)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "onnx_latency.json", {"args": vars(args), "rows": rows, "pairings": pairs,
                                                   "environment": environment(torch.device("cpu"), "fp32")})
    plot(rows, out / "onnx_latency.png")
    print(f"\nwrote {out / 'onnx_latency.json'} and {out / 'onnx_latency.png'}")
    if not args.export_dir:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
