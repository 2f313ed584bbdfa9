"""A compact Llama-architecture decoder for the end-to-end decode benchmark.

Same computation as Hugging Face ``LlamaForCausalLM`` (RMSNorm, rotary embeddings, grouped-query
attention with a KV cache, SwiGLU MLP, untied ``lm_head``), with a static preallocated cache and
none of the generic machinery, so that what the benchmark times is the linear layers' share and
not framework overhead. Its projections are plain ``nn.Linear`` modules named as in HF
(``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``gate_proj``, ``up_proj``, ``down_proj``,
``lm_head``), so ``qsparse_kernels.convert`` swaps them like in an HF model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import sdpa
from ..nn.rms_norm import reference as rms_norm_reference

#: The compact model's attention choices: ``upcast`` (the default) computes float32 / bf16 / fp16 CPU
#: attention in float32 (:mod:`qsparse_kernels.attention`), ``sdpa`` is torch's SDPA in the model's
#: dtype (Hugging Face's default). The same for every variant of a run.
ATTENTION = {"upcast": sdpa, "sdpa": F.scaled_dot_product_attention}
ATTENTION_HELP = ("every variant's attention (dense's too): upcast = CPU attention computed in float32 "
                  "(qsparse_kernels.attention; torch's bf16 CPU SDPA takes ~4x as long at 144 cached tokens), "
                  "sdpa = torch's SDPA in the model's dtype (Hugging Face's default)")


@dataclass(frozen=True)
class LlamaShape:
    """Model dimensions; the defaults are TinyLlama-1.1B's."""

    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_hidden_layers: int = 22
    num_attention_heads: int = 32
    num_key_value_heads: int = 4
    vocab_size: int = 32000
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    @classmethod
    def from_hf_config(cls, config) -> LlamaShape:
        """From an HF ``config.json`` path, a dict, or a ``transformers`` config object."""
        if isinstance(config, str):
            with open(config) as f:
                config = json.load(f)
        get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
        kw = {f.name: get(f.name) for f in fields(cls) if get(f.name) is not None}
        return cls(**kw)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class LlamaRMSNorm(nn.Module):
    """HF's ``LlamaRMSNorm``: its class name, attributes and math (normalise in float32, cast back,
    then scale), so ``convert(fast_norm=True)`` swaps it for the library's as it does HF's."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x):
        return rms_norm_reference(x, self.weight, self.variance_epsilon)


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class Attention(nn.Module):
    def __init__(self, s: LlamaShape, attention: str = "upcast"):
        super().__init__()
        hd = s.head_dim
        self.s = s
        self.attend = ATTENTION[attention]
        self.q_proj = nn.Linear(s.hidden_size, s.num_attention_heads * hd, bias=False)
        self.k_proj = nn.Linear(s.hidden_size, s.num_key_value_heads * hd, bias=False)
        self.v_proj = nn.Linear(s.hidden_size, s.num_key_value_heads * hd, bias=False)
        self.o_proj = nn.Linear(s.num_attention_heads * hd, s.hidden_size, bias=False)

    def forward(self, x, cos, sin, cache_k, cache_v, pos: int):
        """x: [B, T, hidden]; caches: [B, kv_heads, max_len, head_dim], filled up to ``pos``."""
        B, T, _ = x.shape
        s, hd = self.s, self.s.head_dim
        q = self.q_proj(x).view(B, T, s.num_attention_heads, hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, s.num_key_value_heads, hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, s.num_key_value_heads, hd).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        cache_k[:, :, pos : pos + T] = k
        cache_v[:, :, pos : pos + T] = v
        keys, values = cache_k[:, :, : pos + T], cache_v[:, :, : pos + T]
        # As Hugging Face's Llama (sdpa): one query (decode) attends to every cached key, so the
        # causal mask is for prefill only (SDPA's is_causal aligns the mask top-left).
        out = self.attend(q, keys, values, is_causal=T > 1, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, s: LlamaShape):
        super().__init__()
        self.gate_proj = nn.Linear(s.hidden_size, s.intermediate_size, bias=False)
        self.up_proj = nn.Linear(s.hidden_size, s.intermediate_size, bias=False)
        self.down_proj = nn.Linear(s.intermediate_size, s.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, s: LlamaShape, attention: str = "upcast"):
        super().__init__()
        self.input_layernorm = LlamaRMSNorm(s.hidden_size, s.rms_norm_eps)
        self.self_attn = Attention(s, attention)
        self.post_attention_layernorm = LlamaRMSNorm(s.hidden_size, s.rms_norm_eps)
        self.mlp = MLP(s)

    def forward(self, x, cos, sin, ck, cv, pos):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ck, cv, pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaDecoder(nn.Module):
    """Greedy decoder. ``generate(prompt [B, T0], n)`` returns ``[B, n]`` new token ids.
    ``attention``: a key of :data:`ATTENTION`."""

    def __init__(self, s: LlamaShape, attention: str = "upcast"):
        super().__init__()
        if attention not in ATTENTION:
            raise ValueError(f"attention: expected one of {sorted(ATTENTION)}, got {attention!r}")
        self.shape = s
        self.embed_tokens = nn.Embedding(s.vocab_size, s.hidden_size)
        self.layers = nn.ModuleList(Layer(s, attention) for _ in range(s.num_hidden_layers))
        self.norm = LlamaRMSNorm(s.hidden_size, s.rms_norm_eps)
        self.lm_head = nn.Linear(s.hidden_size, s.vocab_size, bias=False)

    def _rope(self, pos: int, T: int, device, dtype):
        """cos, sin [T, head_dim] for positions pos..pos+T-1, from a table grown on demand."""
        table = getattr(self, "_rope_table", None)
        if table is None or table[0].shape[0] < pos + T or table[0].dtype != dtype or table[0].device != device:
            hd, n = self.shape.head_dim, max(2 * (pos + T), 256)
            inv = 1.0 / (self.shape.rope_theta ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd))
            ang = torch.arange(n, device=device, dtype=torch.float32)[:, None] * inv[None]
            emb = torch.cat((ang, ang), dim=-1)
            table = self._rope_table = (emb.cos().to(dtype), emb.sin().to(dtype))
        return table[0][pos : pos + T], table[1][pos : pos + T]

    def new_cache(self, batch: int, max_len: int, device, dtype):
        s = self.shape
        shape = (s.num_hidden_layers, 2, batch, s.num_key_value_heads, max_len, s.head_dim)
        return torch.zeros(shape, device=device, dtype=dtype)

    def step(self, tokens: torch.Tensor, cache: torch.Tensor, pos: int) -> torch.Tensor:
        """tokens: [B, T] at positions pos..pos+T-1 -> logits of the last position, [B, vocab]."""
        x = self.embed_tokens(tokens)
        cos, sin = self._rope(pos, tokens.shape[1], x.device, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache[i, 0], cache[i, 1], pos)
        return self.lm_head(self.norm(x[:, -1:]))[:, 0]

    @torch.inference_mode()
    def generate(self, prompt: torch.Tensor, n: int, timer=None) -> torch.Tensor:
        """Greedy decoding; ``timer(phase)`` is called at "prefill" and "decode" boundaries."""
        B, T0 = prompt.shape
        dtype = self.embed_tokens.weight.dtype
        cache = self.new_cache(B, T0 + n, prompt.device, dtype)
        if timer:
            timer("start")
        nxt = self.step(prompt, cache, 0).argmax(-1, keepdim=True)
        if timer:
            timer("prefill")
        out = [nxt]
        for i in range(n - 1):
            nxt = self.step(nxt, cache, T0 + i).argmax(-1, keepdim=True)
            out.append(nxt)
        if timer:
            timer("decode")
        return torch.cat(out, dim=1)
