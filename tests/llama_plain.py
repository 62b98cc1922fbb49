"""A LLaMA written in plain PyTorch (no transformers), with unusual names and optional fused
projections, used to check that colafx finds projections by dataflow, not by name."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.scale


def rope(x, pos):  # x: [b, h, s, dh]
    dh = x.shape[-1]
    inv = 1.0 / (10000 ** (torch.arange(0, dh, 2, dtype=torch.float32, device=x.device) / dh))
    ang = pos[:, None].float() * inv[None, :]
    cos, sin = ang.cos().repeat(1, 2), ang.sin().repeat(1, 2)
    x1, x2 = x[..., : dh // 2], x[..., dh // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def gelu_new(x):  # GPT-2 / Phi's tanh GELU written out as elementwise math
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


MLP_ACTS = {
    "silu": F.silu,
    "gelu_new": gelu_new,
    "relu2": lambda x: torch.relu(x) ** 2,
    "where": lambda x: torch.where(x > 0, x, 0.01 * x),  # leaky ReLU built from torch.where
}
# "eager": softmax(q·kᵀ/√d masked_fill) · v; "softcap": Gemma2's tanh(s / c) · c before the softmax;
# "einsum": the matmuls written as einsums; "where": torch.where(mask, scores, -inf) masking.
ATTENTIONS = ("sdpa", "eager", "softcap", "einsum", "where", "flex")


class Block(nn.Module):
    def __init__(self, d, ff, heads, fused=False, eager_attention=False, bias=False, dropout=0.0,
                 attention="sdpa", act="silu", gated=True):
        super().__init__()
        self.heads, self.fused, self.gated = heads, fused, gated
        self.attention_kind = "eager" if eager_attention else attention
        self.act = MLP_ACTS[act]
        self.n1, self.n2 = RMSNorm(d), RMSNorm(d)
        if fused:
            self.wqkv = nn.Linear(d, 3 * d, bias=bias)
            self.w13 = nn.Linear(d, 2 * ff, bias=False)
        else:
            self.wq, self.wk, self.wv = (nn.Linear(d, d, bias=bias) for _ in range(3))
            self.w1 = nn.Linear(d, ff, bias=False)
            self.w3 = nn.Linear(d, ff, bias=False) if gated else None
        self.wo = nn.Linear(d, d, bias=False)
        self.w2 = nn.Linear(ff, d, bias=False)
        self.drop = nn.Dropout(dropout)

    def attention(self, x):
        b, s, d = x.shape
        if self.fused:
            q, k, v = self.wqkv(x).split(d, dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q, k, v = (t.view(b, s, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        pos = torch.arange(s, device=x.device)
        q, k = rope(q, pos), rope(k, pos)
        kind = self.attention_kind
        mask = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
        if kind == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif kind == "flex":
            from torch.nn.attention.flex_attention import flex_attention

            out = flex_attention(q, k, v, score_mod=lambda sc, b, h, qi, ki: torch.where(qi >= ki, sc, -float("inf")))
        elif kind == "einsum":
            scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / (q.shape[-1] ** 0.5)
            probs = self.drop(scores.masked_fill(~mask, float("-inf")).softmax(-1))
            out = torch.einsum("bhqk,bhkd->bhqd", probs, v)
        else:
            scores = (q @ k.transpose(-2, -1)) / (q.shape[-1] ** 0.5)
            if kind == "softcap":
                scores = torch.tanh(scores / 30.0) * 30.0
            if kind == "where":
                scores = torch.where(mask, scores, torch.finfo(scores.dtype).min)
            else:
                scores = scores.masked_fill(~mask, float("-inf"))
            probs = self.drop(scores.softmax(-1))
            out = probs @ v
        return self.wo(out.transpose(1, 2).reshape(b, s, d))

    def mlp(self, x):
        if self.fused:
            a, c = self.w13(x).chunk(2, dim=-1)
            return self.w2(self.act(a) * c)
        if not self.gated:
            return self.w2(self.act(self.w1(x)))
        return self.w2(self.act(self.w1(x)) * self.w3(x))

    def forward(self, x):
        x = x + self.drop(self.attention(self.n1(x)))
        return x + self.drop(self.mlp(self.n2(x)))


class PlainLlama(nn.Module):
    """Token ids -> logits. ``q_proj`` is a decoy: named like a projection, used as a value head."""

    def __init__(self, vocab=97, d=48, ff=112, heads=4, layers=2, fused=False, eager_attention=False,
                 bias=False, dropout=0.0, decoy=True, attention="sdpa", act="silu", gated=True):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, ff, heads, fused, eager_attention, bias, dropout, attention, act, gated)
                                    for _ in range(layers))
        self.norm = RMSNorm(d)
        self.out = nn.Linear(d, vocab, bias=False)
        self.q_proj = nn.Linear(d, 1) if decoy else None

    def forward(self, ids):
        h = self.tok(ids)
        for blk in self.blocks:
            h = blk(h)
        h = self.norm(h)
        logits = self.out(h)
        if self.q_proj is not None:
            return logits, self.q_proj(h).squeeze(-1)
        return logits
