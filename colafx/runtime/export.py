"""ONNX export of LLaMA-family causal LMs (dense, CoLA, int8 / int4) and onnxruntime generation.

``export_onnx`` wraps the model in :class:`KVCacheLM`: one graph for prefill and decode whose inputs
are ``input_ids`` [batch, seq], ``attention_mask`` [batch, past + seq] (1 = token, 0 = left padding)
and, per layer, ``past_key_i`` / ``past_value_i`` [batch, kv_heads, past, head_dim] (``past`` = 0 for
the prefill) and whose outputs are ``logits`` [batch, seq, vocab] and ``present_key_i`` /
``present_value_i`` [batch, kv_heads, past + seq, head_dim]. The decoder layers are the model's own
modules; only the cache is replaced by flat tensors, so CoLA modules and the quantized linears export
as they run. colafx custom ops map to ONNX through ``colafx.kernels.onnx.onnx_translation_table()``
(``onnx_ops="contrib"``: com.microsoft MatMulNBits for int8 and int4; ``"contrib-vnni"``: per-channel
W8A8 through MatMulIntegerToFloat, for CPUs with VNNI / AMX; ``"standard"``: ai.onnx only).

Beside ``model.onnx`` the export writes ``model.json`` (the Hugging Face config and the graph's input
/ output layout) and, when a tokenizer is given, ``model-tokenizer/``. :class:`OnnxCausalLM` reads them.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from colafx.runtime.device import DEVICE_HELP, cpu_features, resolve_device
from colafx.files import atomic_write_json

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
QUANT_OPS = {"int8": "colafx::int8_linear", "int4": "colafx::int4_linear"}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
INT4_GROUP_SIZE = 32  # int4 exports' default columns per scale (MatMulNBits' block; onnxruntime's quantizer default)
ONNX_OPS = ("contrib", "contrib-vnni", "standard")  # as colafx.kernels.onnx.ONNX_OPS (onnxscript is imported on export only)
# Attention / RotaryEmbedding / RMSNormalization are ai.onnx operators from opset 23 on; with them
# the exporter writes one node each, and fuse_attention_cache hands Attention the KV cache.
DEFAULT_OPSET = 23
META_FORMAT = "colafx-onnx"
_EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf caps a single file at 2 GB


def onnxruntime_u8s8_exact() -> bool:
    """True when onnxruntime's uint8 × int8 GEMM accumulates exactly on this CPU: x86 with
    AVX512-VNNI, AVX-VNNI or AMX (int32 dot products), or a non-x86 CPU. x86 CPUs with AVX2 only sum
    pairs of u8·s8 products in saturating int16, which ``onnx_ops="contrib-vnni"`` exports overflow."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(cpu_features()))


class _FlatCache:
    """Stands in for a Hugging Face ``Cache``: concatenates each layer's past key/value tensors
    with the new ones and keeps the results as the graph's ``present`` outputs."""

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]]):
        self.past = past
        self.present: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(past)

    def update(self, key, value, layer_idx, *args, **kwargs):
        past_key, past_value = self.past[layer_idx]
        key, value = torch.cat([past_key, key], dim=2), torch.cat([past_value, value], dim=2)
        self.present[layer_idx] = (key, value)
        return key, value


class KVCacheLM(nn.Module):
    """``(input_ids, attention_mask, past_key_0, past_value_0, ...) -> (logits, present_key_0,
    present_value_0, ...)`` around a Hugging Face LLaMA-family causal LM; without past tensors it
    returns the logits only.

    ``attention_mask`` [batch, past + seq] (1 = token, 0 = padding) covers the cached and the new
    tokens, so left-padded batches work: a token's position is the number of real tokens before it
    (as Hugging Face ``generate`` counts), and padding is never attended to. The additive mask is
    causal (and sliding-window when the config has one).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor):
        body = self.model.model
        hidden = body.embed_tokens(input_ids)
        seq = input_ids.shape[1]
        past_len = past[0].shape[2] if past else 0
        keep = attention_mask.to(torch.bool)
        position_ids = (torch.cumsum(keep.to(torch.long), dim=1) - 1).clamp(min=0)[:, past_len:]
        queries = torch.arange(seq, device=input_ids.device) + past_len
        keys = torch.arange(past_len + seq, device=input_ids.device)
        visible = keys[None, :] <= queries[:, None]
        window = getattr(self.model.config, "sliding_window", None)
        if window:
            visible = visible & (queries[:, None] - keys[None, :] < window)
        visible = visible[None, None] & keep[:, None, None, :]
        mask = torch.zeros(visible.shape, dtype=hidden.dtype, device=hidden.device)
        mask = mask.masked_fill(~visible, torch.finfo(hidden.dtype).min)
        rotary = body.rotary_emb(hidden, position_ids)
        cache = _FlatCache(list(zip(past[0::2], past[1::2]))) if past else None
        for layer in body.layers[: self.model.config.num_hidden_layers]:
            hidden = layer(hidden, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
                           use_cache=cache is not None, position_embeddings=rotary)
        logits = self.model.lm_head(body.norm(hidden))
        if cache is None:
            return logits
        return (logits, *(t for kv in cache.present for t in kv))


def check_supported(model: nn.Module) -> None:
    """Check that ``model`` is a Hugging Face LLaMA-family causal LM that the exporter can wrap.

    Raises:
        ValueError: naming what is missing or unsupported.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"cannot export {type(model).__name__} (model_type {model_type!r}): colafx exports "
                         f"Hugging Face causal LMs of type {', '.join(SUPPORTED_MODEL_TYPES)}")
    body = getattr(model, "model", None)
    for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(body, name):
            raise ValueError(f"cannot export {type(model).__name__}: its decoder has no {name!r}")
    if not hasattr(model, "lm_head"):
        raise ValueError(f"cannot export {type(model).__name__}: it has no lm_head")


def kv_layout(config) -> dict:
    """Number of layers, key/value heads and head size of the cache tensors of ``config``."""
    heads = config.num_attention_heads
    return {"num_layers": config.num_hidden_layers,
            "num_kv_heads": getattr(config, "num_key_value_heads", None) or heads,
            "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads}


def io_names(num_layers: int, kv_cache: bool) -> tuple[list[str], list[str]]:
    """Input and output names of the exported graph."""
    if not kv_cache:
        return ["input_ids", "attention_mask"], ["logits"]
    past = [f"past_{kind}_{i}" for i in range(num_layers) for kind in ("key", "value")]
    present = [f"present_{kind}_{i}" for i in range(num_layers) for kind in ("key", "value")]
    return ["input_ids", "attention_mask", *past], ["logits", *present]


def _quant_mode(exported: torch.export.ExportedProgram) -> str | None:
    """Which quantized linear ops the captured graph calls: "int8", "int4", or None."""
    found = {str(node.target.name()) for node in exported.graph.nodes
             if node.op == "call_function" and hasattr(node.target, "name")}
    modes = [mode for mode, op in QUANT_OPS.items() if any(name.startswith(op) for name in found)]
    if len(modes) > 1:
        raise ValueError("the model mixes int8 and int4 quantized linears; export one quantization mode")
    return modes[0] if modes else None


def _check_quant(requested: str | None, found: str | None) -> None:
    if requested is not None and requested not in QUANT_OPS:
        raise ValueError(f"unknown quant {requested!r}; choose None, 'int8' or 'int4'")
    if requested == found:
        return
    if found is None:
        bits = requested.removeprefix("int")
        raise ValueError(f"quant={requested!r} but the model was not quantized to {requested}: run "
                         f"colafx.quantize_(model, colafx.QuantConfig(weight_bits={bits})) first")
    raise ValueError(f"the model is quantized to {found} but quant={requested!r} was requested: "
                     f"pass quant={found!r}")


def _translation_table(onnx_ops: str) -> dict:
    try:
        from colafx.kernels.onnx import onnx_translation_table
    except ImportError:
        return {}
    return onnx_translation_table(ops=onnx_ops)


def _example_inputs(model: nn.Module, kv_cache: bool, dtype: torch.dtype):
    """Example inputs (sizes ≥ 2 so torch.export keeps every axis symbolic) and their dynamic shapes."""
    device = next(model.parameters()).device
    batch, seq, past_len = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("past")
    ids = torch.zeros(2, 3, dtype=torch.long, device=device)
    total = torch.export.Dim.AUTO  # past + seq: a sum of two dims, which Dim cannot spell
    if not kv_cache:
        return (ids, torch.ones(2, 3, dtype=torch.long, device=device)), ({0: batch, 1: seq}, {0: batch, 1: seq})
    layout = kv_layout(model.config)
    shape = (2, layout["num_kv_heads"], 4, layout["head_dim"])
    past = tuple(torch.zeros(shape, dtype=dtype, device=device) for _ in range(2 * layout["num_layers"]))
    mask = torch.ones(2, 7, dtype=torch.long, device=device)
    return (ids, mask, *past), ({0: batch, 1: seq}, {0: batch, 1: total}, tuple({0: batch, 2: past_len} for _ in past))


def export_onnx(model: nn.Module, path: str | os.PathLike, quant: str | None = None, kv_cache: bool = True,
                dtype: str = "fp32", opset: int | None = None, tokenizer=None, onnx_ops: str = "contrib") -> Path:
    """Export a Hugging Face LLaMA-family causal LM (dense, colaified or quantized) to ONNX.

    ``quant``: None for a float model, ``"int8"`` / ``"int4"`` for a model prepared with
    ``colafx.quantize_`` (weight_bits 8 / 4); its linears become onnxruntime integer ops.
    ``kv_cache``: add past/present key-value tensors (one graph for prefill and decode).
    ``dtype``: ``"fp32"`` or ``"fp16"`` (the model is copied and cast; it is never modified).
    ``opset``: ONNX opset (default 23: ai.onnx ``Attention`` with the KV cache inside it,
    ``RotaryEmbedding`` and ``RMSNormalization``, one node each; an older opset spells them in
    ~35 primitive nodes per layer, for runtimes without opset 23). ``tokenizer``: saved beside the
    file if given.
    ``onnx_ops``: how quantized linears are written: "contrib" (default) = onnxruntime's fused
    ``com.microsoft::MatMulNBits``, one node per linear (int8: bits 8; activations quantized per
    block of K by onnxruntime when act_bits is 8); "standard" = ai.onnx operators only (int8: the
    op's exact per-token quantization + ``MatMulInteger``; int4: dequantized in the graph);
    "contrib-vnni" = as "contrib", but per-channel W8A8 linears take the op's exact per-token
    codes through ``com.microsoft::MatMulIntegerToFloat`` (onnxruntime's uint8 × int8 GEMM, faster
    than MatMulNBits on many tokens on a VNNI CPU; it overflows on x86 CPUs without VNNI / AMX,
    where :class:`OnnxCausalLM` refuses the file). Writes ``path`` (atomically), ``<stem>.json``
    and ``<stem>-tokenizer/``; checks the file with
    ``onnx.checker``.

    Returns:
        the path of the .onnx file.

    Raises:
        ValueError: unsupported model, unknown ``dtype`` / ``quant`` / ``onnx_ops``, or a ``quant``
            that does not match how the model was prepared.
    """
    import onnx

    check_supported(model)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if quant is not None and quant not in QUANT_OPS:
        raise ValueError(f"unknown quant {quant!r}; choose None, 'int8' or 'int4'")
    if onnx_ops not in ONNX_OPS:
        raise ValueError(f"unknown onnx_ops {onnx_ops!r}; choose one of {', '.join(ONNX_OPS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    opset = DEFAULT_OPSET if opset is None else opset
    torch_dtype = DTYPES[dtype]
    float_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if float_dtype != torch_dtype:
        model = copy.deepcopy(model).to(torch_dtype)
    wrapper = KVCacheLM(model).eval()
    args, dynamic = _example_inputs(model, kv_cache, torch_dtype)
    with torch.no_grad():
        exported = torch.export.export(wrapper, args, dynamic_shapes=dynamic, strict=False)
    _check_quant(quant, _quant_mode(exported))
    inputs, outputs = io_names(model.config.num_hidden_layers, kv_cache)
    with _quiet_exporter():
        program = torch.onnx.export(exported, input_names=inputs, output_names=outputs, opset_version=opset,
                                    dynamo=True, custom_translation_table=_translation_table(onnx_ops), verbose=False)
    _save_program(program, path, onnx_ops)
    onnx.checker.check_model(str(path))
    _write_meta(model, path, quant, kv_cache, dtype, inputs, outputs, tokenizer, onnx_ops, opset)
    return path


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporter's notes that are not about this model: "torchvision is not installed.
    Skipping torchvision::nms" (one per vision op) and pytree's LeafSpec FutureWarning."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
            yield
    finally:
        logger.setLevel(level)


def _save_program(program, path: Path, onnx_ops: str) -> None:
    """Save an ``ONNXProgram`` to ``path`` without ever leaving a half-written file there. With
    ``onnx_ops="contrib"`` / ``"contrib-vnni"`` the fused GEMM nodes that share an input are merged
    first; then each layer's Attention takes its KV cache
    (:func:`~colafx.passes.onnx_attention.fuse_attention_cache`)."""
    import onnx

    from colafx.passes.onnx_attention import fuse_attention_cache

    big = sum(t.numel() * t.element_size() for t in program.exported_program.state_dict.values()) \
        > _EXTERNAL_DATA_BYTES
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        target = Path(tmp) / path.name
        if onnx_ops.startswith("contrib"):
            from colafx.kernels.onnx import fold_quantized_weights, fuse_shared_input_gemms

            fold_quantized_weights(program.model)
            proto = program.model_proto
            fuse_shared_input_gemms(proto)
        else:
            proto = program.model_proto
        fuse_attention_cache(proto)
        onnx.save_model(proto, str(target), save_as_external_data=big, all_tensors_to_one_file=True,
                        location=f"{path.name}.data")
        for item in sorted(Path(tmp).iterdir(), key=lambda p: p.name == path.name):
            os.replace(item, path.parent / item.name)  # data first, the .onnx last


def meta_path(path: str | os.PathLike) -> Path:
    """The JSON file written beside an exported ``model.onnx``: ``model.json``."""
    return Path(path).with_suffix(".json")


def tokenizer_dir(path: str | os.PathLike) -> Path:
    """The tokenizer folder written beside an exported ``model.onnx``: ``model-tokenizer/``."""
    path = Path(path)
    return path.with_name(f"{path.stem}-tokenizer")


def _write_meta(model, path: Path, quant, kv_cache, dtype, inputs, outputs, tokenizer, onnx_ops, opset) -> None:
    config = model.config
    generation = getattr(model, "generation_config", None)
    meta = {"format": META_FORMAT, "version": 1, "onnx_file": path.name, "quant": quant, "kv_cache": kv_cache,
            "dtype": dtype, "onnx_ops": onnx_ops, "opset": opset, "inputs": inputs, "outputs": outputs, **kv_layout(config),
            "vocab_size": config.vocab_size,
            "eos_token_id": getattr(generation, "eos_token_id", None) or config.eos_token_id,
            "pad_token_id": getattr(generation, "pad_token_id", None) or getattr(config, "pad_token_id", None),
            "hf_config": config.to_dict()}
    if tokenizer is not None:
        folder = tokenizer_dir(path)
        staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{folder.name}."))
        tokenizer.save_pretrained(str(staging))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
        meta["tokenizer"] = folder.name
    atomic_write_json(meta_path(path), meta)


class OnnxCausalLM:
    """Run an exported model with onnxruntime: ``logits``, KV-cached greedy or sampled ``generate``.

    ``path``: the .onnx file written by :func:`export_onnx` (its ``.json`` must sit beside it).
    ``threads``: onnxruntime intra-op threads (default: onnxruntime's choice).
    ``providers``: onnxruntime execution providers (default CPU).

    Raises:
        FileNotFoundError: the .onnx file or its .json is missing.
        ValueError: the .json is corrupt or not written by colafx.
        RuntimeError: an ``onnx_ops="contrib-vnni"`` int8 export on the CPU provider of an x86 CPU
            without VNNI / AMX, where onnxruntime's u8·s8 GEMM overflows; or an opset-23 export that
            the installed onnxruntime cannot load (it names the upgrade or ``--opset 20``).
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None, providers: list[str] | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX model {self.path} does not exist")
        meta_file = meta_path(self.path)
        if not meta_file.is_file():
            raise FileNotFoundError(f"{meta_file} is missing: export the model with colafx.export_onnx")
        try:
            self.meta = json.loads(meta_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{meta_file} is corrupt (not valid JSON): {err}") from None
        if not isinstance(self.meta, dict) or self.meta.get("format") != META_FORMAT:
            raise ValueError(f"{meta_file} was not written by colafx.export_onnx")
        providers = providers or ["CPUExecutionProvider"]
        if (self.meta.get("onnx_ops") == "contrib-vnni" and self.meta.get("quant") == "int8"
                and "CPUExecutionProvider" in providers and not onnxruntime_u8s8_exact()):
            raise RuntimeError(f"{self.path} was exported with onnx_ops='contrib-vnni', whose uint8 x int8 GEMM "
                               "overflows on this CPU (x86 without VNNI / AMX): re-export with onnx_ops='contrib'")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as err:  # onnxruntime's own exception types live in a private module
            opset = self.meta.get("opset") or 0
            if opset < DEFAULT_OPSET:
                raise
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RuntimeError(f"onnxruntime {ort.__version__} cannot load {self.path} (ONNX opset {opset}): "
                               f"{reason}; upgrade onnxruntime, or export again with --opset 20") from err
        self.kv_cache = bool(self.meta["kv_cache"])
        self.float_dtype = np.float16 if self.meta["dtype"] == "fp16" else np.float32

    def tokenizer(self):
        """The tokenizer saved beside the model.

        Raises:
            FileNotFoundError: the export did not record a tokenizer.
        """
        from transformers import AutoTokenizer

        name = self.meta.get("tokenizer")
        if not name:
            raise FileNotFoundError(f"{self.path} was exported without a tokenizer")
        return AutoTokenizer.from_pretrained(str(self.path.parent / name))

    def empty_cache(self, batch_size: int) -> list[np.ndarray]:
        """Zero-length past key/value arrays for a prefill of ``batch_size`` sequences."""
        shape = (batch_size, self.meta["num_kv_heads"], 0, self.meta["head_dim"])
        return [np.zeros(shape, dtype=self.float_dtype) for _ in range(2 * self.meta["num_layers"])]

    def forward(self, input_ids, past: list[np.ndarray] | None = None, attention_mask=None):
        """Run the graph once: ``(logits, present)``; ``present`` is None for a graph without cache.

        ``input_ids``: int [batch, seq] (numpy or torch). ``past``: the previous call's ``present``
        (default: an empty cache). ``attention_mask``: int [batch, past + seq], 1 = token, 0 = (left)
        padding, covering the cached tokens too (default: all ones).

        Raises:
            ValueError: ``attention_mask`` of the wrong shape.
        """
        ids = np.ascontiguousarray(np.asarray(input_ids, dtype=np.int64))
        past = (past if past is not None else self.empty_cache(ids.shape[0])) if self.kv_cache else []
        total = ids.shape[1] + (past[0].shape[2] if past else 0)
        feeds = {"input_ids": ids}
        if "attention_mask" in self.meta["inputs"]:
            mask = np.ones((ids.shape[0], total), np.int64) if attention_mask is None else \
                np.ascontiguousarray(np.asarray(attention_mask, dtype=np.int64))
            if mask.shape != (ids.shape[0], total):
                raise ValueError(f"attention_mask must be [batch, past + seq] = {[ids.shape[0], total]}, "
                                 f"got {list(mask.shape)}")
            feeds["attention_mask"] = mask
        elif attention_mask is not None and not np.asarray(attention_mask).all():
            raise ValueError(f"{self.path} was exported without an attention_mask input: export it again "
                             "to run padded batches")
        feeds.update(zip(self.meta["inputs"][-len(past):] if past else [], past))
        outputs = self.session.run(None, feeds)
        return outputs[0], (outputs[1:] if self.kv_cache else None)

    def generate(self, input_ids, max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, eos_token_id: int | list[int] | None = None, seed: int | None = None,
                 attention_mask=None):
        """Continue ``input_ids`` [batch, seq] by up to ``max_new_tokens`` tokens, like Hugging Face
        ``generate``: greedy by default, or sampling with ``temperature`` and ``top_k``; finished
        sequences (``eos_token_id``, default the model's) are padded until all are done.
        ``attention_mask`` [batch, seq] (1 = token, 0 = padding) runs a left-padded batch of prompts
        of different lengths (a tokenizer with ``padding_side="left"`` gives one).

        Returns:
            int64 [batch, seq + new] of the same kind as ``input_ids`` (torch tensor or numpy array).

        Raises:
            ValueError: empty input, ``max_new_tokens`` < 0, ``temperature`` ≤ 0 when sampling, or an
                ``attention_mask`` that is not [batch, seq] left padding with a token in every row.
        """
        as_torch = isinstance(input_ids, torch.Tensor)
        ids = np.asarray(input_ids.cpu() if as_torch else input_ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [batch, seq] with seq ≥ 1, got shape {ids.shape}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be ≥ 0, got {max_new_tokens}")
        if do_sample and temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        mask = _left_padding_mask(attention_mask, ids.shape)
        eos = self.meta.get("eos_token_id") if eos_token_id is None else eos_token_id
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        pad = self.meta.get("pad_token_id")
        pad = pad if pad is not None else (eos[0] if eos else 0)
        rng = np.random.default_rng(seed)
        running = np.ones(ids.shape[0], dtype=bool)
        past, step_input = None, ids
        for _ in range(max_new_tokens):
            logits, past = self.forward(step_input, past, attention_mask=mask)
            token = self._next_token(logits[:, -1, :].astype(np.float32), do_sample, temperature, top_k, rng)
            token = np.where(running, token, pad)
            ids = np.concatenate([ids, token[:, None]], axis=1)
            mask = np.concatenate([mask, np.ones((ids.shape[0], 1), np.int64)], axis=1)
            running &= ~np.isin(token, eos)
            if not running.any():
                break
            step_input = token[:, None] if self.kv_cache else ids
        return torch.from_numpy(ids) if as_torch else ids

    @staticmethod
    def _next_token(logits: np.ndarray, do_sample: bool, temperature: float, top_k: int | None, rng) -> np.ndarray:
        if not do_sample:
            return logits.argmax(axis=-1)
        logits = logits / temperature
        if top_k:
            kth = np.sort(logits, axis=-1)[:, -min(top_k, logits.shape[-1])][:, None]
            logits = np.where(logits < kth, -np.inf, logits)
        probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        return np.array([rng.choice(len(p), p=p) for p in probs], dtype=np.int64)


def _left_padding_mask(attention_mask, shape: tuple[int, int]) -> np.ndarray:
    """``attention_mask`` as int64 [batch, seq] (all ones when None), checked to be left padding."""
    if attention_mask is None:
        return np.ones(shape, np.int64)
    mask = np.asarray(attention_mask.cpu() if isinstance(attention_mask, torch.Tensor) else attention_mask)
    if mask.shape != tuple(shape):
        raise ValueError(f"attention_mask must have input_ids' shape {list(shape)}, got {list(mask.shape)}")
    mask = (mask != 0).astype(np.int64)
    if not mask[:, -1].all() or (np.diff(mask, axis=1) < 0).any():
        raise ValueError("attention_mask must be left padding (0s then 1s, the last column all 1s); use a "
                         "tokenizer with padding_side='left'")
    return mask


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``colafx export``."""
    parser.add_argument("--model", required=True,
                        help="model to export: a colafx checkpoint folder, a Hugging Face model folder, a .gguf "
                             "file, or 'smollm2' for the packaged SmolLM2-135M")
    parser.add_argument("--out", required=True, help="path of the .onnx file to write (its .json and tokenizer "
                                                      "folder go beside it)")
    parser.add_argument("--quant", choices=sorted(QUANT_OPS), default=None,
                        help="export integer linears; a model not yet quantized is quantized first "
                             "(int8: W8A8 per channel, int4: W4 per group of --group-size columns)")
    parser.add_argument("--quant-head", action="store_true",
                        help="with --quant: quantize the logits head too (smaller, faster decode; a head "
                             "tied to the embedding is untied, the embedding stays float)")
    parser.add_argument("--asymmetric", action="store_true",
                        help="with --quant int4: asymmetric int4, 16 levels over each group's range and a zero "
                             "point per group (onnxruntime's MatMulNBitsQuantizer grid; more accurate, "
                             "MatMulNBits reads the zero points)")
    parser.add_argument("--group-size", type=int, default=None,
                        help=f"with --quant int4: input columns per scale (a power of two >= 16 dividing every "
                             f"linear's d_in; default {INT4_GROUP_SIZE}); 64 reads ~11%% fewer bytes per token "
                             "than 32 and decodes faster, at some accuracy cost (use it with --gptq)")
    parser.add_argument("--gptq", metavar="TEXT", default=None,
                        help="with --quant: GPTQ weights (each linear's output error minimised on this text: a "
                             "file, folder or hf: source; no network unless it names a hub dataset) instead of "
                             "round-to-nearest; same format and speed")
    parser.add_argument("--calibration-tokens", type=int, default=8192,
                        help="with --gptq: tokens of the text used, in windows of 256")
    parser.add_argument("--no-kv-cache", action="store_true", help="export a graph without past/present "
                                                                   "key-value tensors")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="float type of the exported graph")
    parser.add_argument("--onnx-ops", choices=ONNX_OPS, default="contrib",
                        help="how --quant linears are written: contrib = onnxruntime's fused com.microsoft "
                             "MatMulNBits, one node per linear (faster decode; onnxruntime quantizes "
                             "activations per block of K); contrib-vnni = as contrib, but per-channel int8 "
                             "linears take exact per-token codes through MatMulIntegerToFloat (faster "
                             "prefill; needs a CPU with VNNI / AMX, or non-x86); standard = ai.onnx operators only (int8: exact "
                             "per-token quantization + MatMulInteger; int4: dequantized in the graph, no "
                             "size saving), for runtimes other than onnxruntime")
    parser.add_argument("--opset", type=int, default=None,
                        help=f"ONNX opset version (default {DEFAULT_OPSET}: fused Attention / RotaryEmbedding / "
                             "RMSNormalization; 20 for runtimes without opset 23)")
    parser.add_argument("--device", default="auto",
                        help=f"where the model is loaded, quantized and traced: {DEVICE_HELP}; the .onnx file is "
                             "the same either way")


def run_cli(args: argparse.Namespace) -> int:
    """Run ``colafx export``: load, (quantize,) export, print the file and its size."""
    from colafx.runtime.models import load_model, load_tokenizer

    if not str(args.out).endswith(".onnx"):
        raise ValueError(f"--out must name a .onnx file, got {args.out!r}")
    if args.quant_head and not args.quant:
        raise ValueError("--quant-head needs --quant int8 or --quant int4")
    if args.asymmetric and args.quant != "int4":
        raise ValueError("--asymmetric needs --quant int4")
    if args.gptq and not args.quant:
        raise ValueError("--gptq needs --quant int8 or --quant int4")
    if args.group_size is not None and args.quant != "int4":
        raise ValueError("--group-size needs --quant int4")
    device = resolve_device(args.device)
    model = load_model(args.model).to(device)
    try:
        tokenizer = load_tokenizer(args.model)
    except FileNotFoundError:
        tokenizer = None
    if args.quant_head and _is_quantized(model) and not _is_quantized(model.get_output_embeddings()):
        raise ValueError(f"--quant-head: {args.model} is already quantized with a float logits head; "
                         "export it without --quant-head, or start from the float model")
    for flag, used in (("--asymmetric", args.asymmetric), ("--gptq", args.gptq),
                       ("--group-size", args.group_size is not None)):
        if used and _is_quantized(model):
            raise ValueError(f"{flag}: {args.model} is already quantized; start from the float model")
    if args.quant and not _is_quantized(model):
        calibration = None
        if args.gptq:
            from colafx.runtime.data import calibration_ids

            if tokenizer is None:
                raise ValueError(f"--gptq: {args.model} has no tokenizer to read the calibration text with")
            calibration = calibration_ids(args.gptq, tokenizer, args.calibration_tokens).to(device)
        quantize_for_export(model, args.quant, head=args.quant_head, symmetric=not args.asymmetric,
                            calibration=calibration, group_size=args.group_size)
    path = export_onnx(model, args.out, quant=args.quant, kv_cache=not args.no_kv_cache, dtype=args.dtype,
                       opset=args.opset, tokenizer=tokenizer, onnx_ops=args.onnx_ops)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0


def _is_quantized(model: nn.Module) -> bool:
    return any(b.dtype in (torch.int8, torch.uint8) for b in model.buffers())


def quantize_for_export(model: nn.Module, quant: str, head: bool = False, symmetric: bool = True,
                        calibration=None, group_size: Optional[int] = None) -> nn.Module:
    """Quantize ``model`` in place for a ``quant`` export: int8 = W8A8 per output channel,
    int4 = W4 (per group of ``group_size`` input columns) with 8-bit activations; ``symmetric=False``
    gives int4 a zero point per group (``QuantConfig(symmetric=False)``); ``calibration`` (token ids
    [batch, seq]) picks the levels with GPTQ instead of rounding to nearest. Returns the model.

    ``group_size`` (int4; None: ``INT4_GROUP_SIZE``, 32): a power of two ≥ 16 (MatMulNBits'
    block) dividing every linear's d_in; larger groups store fewer scales, so decoding reads fewer
    bytes (64 instead of 32: ~11% faster int4 decode on SmolLM2) at some accuracy cost that GPTQ
    largely recovers.

    ``head=True`` quantizes the logits head too: decoding reads the whole head for every token, so
    for small models with large vocabularies (SmolLM2: 49152 x 576) it is the largest single read.
    A head tied to the input embedding is untied: the embedding stays float (a row gather).

    Raises:
        ValueError: unknown ``quant``, ``symmetric=False`` or a ``group_size`` with int8, a
            ``group_size`` that is not a power of two ≥ 16, or one that does not divide a linear's
            d_in (the error names the linear).
    """
    from colafx.kernels.onnx import nbits_block_size
    from colafx.transform.quantize import QuantConfig, quantize_

    if quant not in QUANT_OPS:
        raise ValueError(f"unknown quant {quant!r}; choose 'int8' or 'int4'")
    if not symmetric and quant != "int4":
        raise ValueError(f"symmetric=False (zero points) is for int4 exports, got quant={quant!r}")
    if group_size is not None and quant != "int4":
        raise ValueError(f"group_size is for int4 exports (int8 is per output channel), got quant={quant!r}")
    group_size = INT4_GROUP_SIZE if group_size is None else group_size
    if isinstance(group_size, bool) or not isinstance(group_size, int) or nbits_block_size(0, group_size) is None:
        raise ValueError(f"group_size must be a power of two >= 16 (MatMulNBits' block size), got {group_size!r}")
    algorithm = "rtn" if calibration is None else "gptq"
    config = QuantConfig(weight_bits=8, act_bits=8, algorithm=algorithm) if quant == "int8" else \
        QuantConfig(weight_bits=4, act_bits=8, group_size=group_size, symmetric=symmetric, algorithm=algorithm)
    quantize_(model, config, filter_fn=(lambda module, fqn: True) if head else None, calibration=calibration)
    if head and getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False  # keep HF from re-tying the new head to the embedding
    return model
