"""A small decoder-only byte LM built from ``nn.Linear`` projections, so ``qsparse_kernels.convert``
swaps them like in an HF model: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` (attention),
``up_proj``, ``down_proj`` (a squared-ReLU FFN, the paper's choice, in every configuration), and a
dense ``lm_head``. Pre-norm RMSNorm, learned positions. ``generate`` decodes with a KV cache, so
every projection sees one row per step (the batch-1 kernels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ModelShape:
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 1024
    ctx: int = 128
    vocab: int = 256


class Attention(nn.Module):
    def __init__(self, s: ModelShape):
        super().__init__()
        self.s = s
        self.q_proj = nn.Linear(s.d_model, s.d_model, bias=False)
        self.k_proj = nn.Linear(s.d_model, s.d_model, bias=False)
        self.v_proj = nn.Linear(s.d_model, s.d_model, bias=False)
        self.o_proj = nn.Linear(s.d_model, s.d_model, bias=False)

    def forward(self, x, cache=None):
        B, T, D = x.shape
        h = self.s.n_heads
        q, k, v = (p(x).view(B, T, h, D // h).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        if cache is not None:  # decode: append to the cache, attend to everything so far
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
        out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, D))


class FFN(nn.Module):
    def __init__(self, s: ModelShape):
        super().__init__()
        self.up_proj = nn.Linear(s.d_model, s.d_ff, bias=False)
        self.down_proj = nn.Linear(s.d_ff, s.d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.relu(self.up_proj(x)).square())


class Block(nn.Module):
    def __init__(self, s: ModelShape):
        super().__init__()
        self.norm1 = nn.RMSNorm(s.d_model)
        self.attn = Attention(s)
        self.norm2 = nn.RMSNorm(s.d_model)
        self.ffn = FFN(s)

    def forward(self, x, cache=None):
        x = x + self.attn(self.norm1(x), cache)
        return x + self.ffn(self.norm2(x))


class ByteLM(nn.Module):
    """``forward(ids [B, T]) -> logits [B, T, 256]``."""

    def __init__(self, s: ModelShape):
        super().__init__()
        self.shape = s
        self.embed = nn.Embedding(s.vocab, s.d_model)
        self.pos = nn.Embedding(s.ctx, s.d_model)
        self.layers = nn.ModuleList(Block(s) for _ in range(s.n_layers))
        self.norm = nn.RMSNorm(s.d_model)
        self.lm_head = nn.Linear(s.d_model, s.vocab, bias=False)
        residual_std = 0.02 / (2 * s.n_layers) ** 0.5  # GPT-2's scaling for projections into the residual
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02)

    def forward(self, ids, caches=None, start: int = 0):
        T = ids.shape[1]
        x = self.embed(ids) + self.pos(torch.arange(start, start + T, device=ids.device))
        for i, layer in enumerate(self.layers):
            x = layer(x, None if caches is None else caches[i])
        return self.lm_head(self.norm(x))

    @torch.inference_mode()
    def generate(self, prompt: torch.Tensor, n: int) -> torch.Tensor:
        """Greedy decoding of ``n`` bytes after ``prompt [1, T0]`` (T0 + n <= ctx), KV-cached."""
        caches = [{} for _ in self.layers]
        nxt = self(prompt, caches)[:, -1:].argmax(-1)
        out = [nxt]
        for i in range(n - 1):
            nxt = self(nxt, caches, start=prompt.shape[1] + i)[:, -1:].argmax(-1)
            out.append(nxt)
        return torch.cat(out, 1)
