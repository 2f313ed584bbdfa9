"""Attention for CPU inference in bf16 / fp16: torch's SDPA computed in float32.

Once a model's projections are sparse or ternary, attention is a large share of a decoded token,
and on the CPU torch's ``scaled_dot_product_attention`` is slow in reduced precision. One decoder
layer of TinyLlama-1.1B (32 query / 4 key-value heads of 64), batch 1, AMD Zen 4, torch 2.14,
2 threads (``benchmarks/bench_attention.py``, median of 7 interleaved rounds):

=====================  ==========  =============================  ==========
queries x keys         bf16 SDPA   bf16 in, float32 SDPA, out     fp16: same
=====================  ==========  =============================  ==========
decode, 1 x 17         38 us       24 us (1.55x)                  3.6x
decode, 1 x 144        237 us      54 us (4.4x)                   8.4x
decode, 1 x 512        872 us      131 us (6.6x)                  11x
decode, 1 x 2048       3485 us     504 us (6.9x)                  10x
prefill, 16 x 16       66 us       69 us (0.96x)                  1.2x
prefill, 128 x 128     1257 us     1094 us (1.15x)                2.2x
=====================  ==========  =============================  ==========

So the inputs are cast to float32, attended there, and the result cast back: more accurate than
the reduced-precision kernel, not less. Other devices and float32 / float64 inputs pass through
unchanged.

- :func:`sdpa`: a drop-in for ``torch.nn.functional.scaled_dot_product_attention`` (inference).
- :func:`use_cpu_attention`: sets a transformers model to it (its ``attn_implementation``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: The name under which :func:`use_cpu_attention` registers with transformers' attention interface.
HF_NAME = "qsparse_cpu_sdpa"

_UPCAST = (torch.bfloat16, torch.float16)


def upcasts(query: torch.Tensor) -> bool:
    """Whether attention over ``query`` runs in float32 here: a CPU tensor in bf16 or fp16."""
    return query.device.type == "cpu" and query.dtype in _UPCAST


def _float(t):
    """``t`` in float32 where it is a floating tensor (a boolean mask stays boolean)."""
    return t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None, *,
         is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` (no dropout), in float32 for bf16 / fp16 CPU inputs.

    query [..., H, T, E], key [..., Hkv, L, E], value [..., Hkv, L, Ev], attn_mask broadcastable to
    [..., H, T, L] (boolean, or additive in any float dtype) -> [..., H, T, Ev] in query's dtype.
    ``enable_gqa``: H a multiple of Hkv, query head h attends to key-value head h // (H / Hkv).
    """
    if not upcasts(query):
        return F.scaled_dot_product_attention(query, key, value, attn_mask, is_causal=is_causal, scale=scale,
                                              enable_gqa=enable_gqa)
    out = F.scaled_dot_product_attention(query.float(), _float(key), _float(value), _float(attn_mask),
                                         is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    return out.to(query.dtype)


def hf_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' ``sdpa`` attention function (same arguments, same masks), in float32 for bf16 /
    fp16 CPU inputs: query [B, H, T, E], key / value [B, Hkv, L, E] -> ([B, T, H, E], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not upcasts(query):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs = {k: _float(v) for k, v in kwargs.items()}
    out, weights = sdpa_attention_forward(module, query.float(), _float(key), _float(value),
                                          _float(attention_mask), **kwargs)
    return out.to(query.dtype), weights


def register() -> str:
    """Registers :func:`hf_attention` (with transformers' SDPA masks) as :data:`HF_NAME`; returns it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(HF_NAME, hf_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(HF_NAME, sdpa_mask)
    return HF_NAME


def use_cpu_attention(model):
    """Sets a transformers model (``PreTrainedModel``) to :func:`hf_attention`, through transformers'
    attention interface (no patched forward); returns the model. Undo with
    ``model.set_attn_implementation("sdpa")``. ``save_pretrained`` does not record it: a saved model
    loads with transformers' default attention."""
    if not callable(getattr(model, "set_attn_implementation", None)):
        raise TypeError(f"model: expected a transformers PreTrainedModel (with set_attn_implementation), "
                        f"got {type(model).__name__}")
    model.set_attn_implementation(register())
    return model
