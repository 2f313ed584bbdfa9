"""Attention for CPU inference in float32, bf16 and fp16, computed in float32.

Once a model's projections are sparse or ternary, attention is a large share of a decoded token,
and on the CPU torch's ``scaled_dot_product_attention`` is slow in reduced precision. One decoder
layer of TinyLlama-1.1B (32 query / 4 key-value heads of 64), batch 1, AMD Zen 4, torch 2.14,
2 threads, bf16, us a call (``benchmarks/bench_attention.py``, median of 7 interleaved rounds):

=====================  =========  ==========================  ==================  ===============
queries x keys         bf16 SDPA  cast to float32, SDPA, back  this module (SDPA  fp16: SDPA /
                                                              / this module)      this module
=====================  =========  ==========================  ==================  ===============
decode, 1 x 17         47         26                          8.1 (5.9x)          8.6x
decode, 1 x 144        255        53                          16.7 (15x)          22x
decode, 1 x 512        918        158                         46 (21x)            34x
decode, 1 x 2048       3626       569                         148 (25x)           39x
causal prefill, 16     93         139                         27 (3.5x)           3.7x
causal prefill, 128    1770       1504                        505 (3.5x)          5.6x
causal prefill, 512    17774      18353                       6881 (2.6x)         4.2x
=====================  =========  ==========================  ==================  ===============

The native kernel (``csrc/cpu/attention.cpp``, AVX-512 or AVX2) computes scores, softmax and the
weighted sum in float32, bf16 / fp16 keys and values widened as they are read (no float32 copy of
the cache). The query heads of a key-value head share each key and value row, and so do up to 64
of them over consecutive positions in a prefill, which reads only the keys its causal mask lets
it see. Calls it does not take (autograd, dropout, the portable ISA path, other arguments of
transformers) cast bf16 / fp16 inputs to float32, attend there and cast the result back, and run
torch's SDPA on float32 ones. Either way bf16 / fp16 results are more accurate than the
reduced-precision kernel's, not less (within one output rounding of float64). float32 inputs take
the kernel too (torch's float32 SDPA / the kernel, same layer, two runs: 3.0-3.1x decoding over 144
keys, 2.2-2.9x for the causal prefill of 128 tokens); other devices and float64 pass through unchanged.

- :func:`sdpa`: a drop-in for ``torch.nn.functional.scaled_dot_product_attention`` (inference).
- :func:`use_cpu_attention`: sets a transformers model to it (its ``attn_implementation``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _native
from ._ops import direct_ok

#: The name under which :func:`use_cpu_attention` registers with transformers' attention interface.
HF_NAME = "qsparse_cpu_sdpa"

_UPCAST = (torch.bfloat16, torch.float16)
_KERNEL_DTYPES = (torch.float32, *_UPCAST)
_KERNEL = _native.loaded()
# Whether the kernel has a vector path at import (torch.compile cannot trace the per-call check).
_VECTOR_ISA = _KERNEL and _native._C.cpu_isa() != "scalar"
# Prefills over more keys than this take the cast path: the kernel's lead over torch's float32 flash
# attention narrows with the context (causal, TinyLlama heads, bf16, Zen 4: 2.95x at 128 tokens,
# 2.6x at 512, 1.35x at 2048, 1.10x at 8192), as its scores for one chunk of positions
# (64 lanes x the keys, float32) outgrow the L2.
_PREFILL_MAX_KEYS = 8192
# transformers' SDPA arguments that the kernel does not implement (it falls back on them).
_HF_OTHER = ("position_bias", "cache", "softcap")


def upcasts(query: torch.Tensor) -> bool:
    """Whether attention over ``query`` runs in float32 here: a CPU tensor in bf16 or fp16."""
    return query.device.type == "cpu" and query.dtype in _UPCAST


def _kernel_ok(query, key, value, attn_mask, is_causal: bool) -> bool:
    """Whether the native kernel takes these :func:`sdpa` arguments: CPU float32 / bf16 / fp16, a
    vector path (AVX-512 or AVX2; the portable one, 3x slower than the cast path at 144 keys, is
    for tests), 4-D, one dtype, heads grouped, a prefill over at most :data:`_PREFILL_MAX_KEYS`
    keys, a mask broadcastable to [B, H, T, L] or
    ``is_causal`` (not both: torch's SDPA refuses that, and the cast path passes its error on),
    no autograd."""
    if not (_KERNEL and query.is_cpu and query.dtype in _KERNEL_DTYPES):
        return False
    if not (query.dim() == 4 and key.dim() == 4 and value.dim() == 4):
        return False
    if not (_VECTOR_ISA if torch.compiler.is_compiling() else _native._C.cpu_isa() != "scalar"):
        return False
    B, H, T, E = query.shape
    if key.dtype != query.dtype or value.dtype != query.dtype or not (key.is_cpu and value.is_cpu):
        return False
    Hkv, L = key.shape[1], key.shape[2]
    if key.shape[0] != B or value.shape[0] != B or key.shape[3] != E or value.shape[1] != Hkv or value.shape[2] != L:
        return False
    if Hkv == 0 or H % Hkv or (T > 1 and L > _PREFILL_MAX_KEYS):
        return False
    if attn_mask is not None:
        if is_causal or not (attn_mask.is_cpu and attn_mask.dtype in (torch.bool, torch.float32, query.dtype)
                             and 2 <= attn_mask.dim() <= 4):  # torch's SDPA refuses 1-D masks
            return False
        want = (B, H, T, L)[4 - attn_mask.dim():]
        if any(m not in (1, w) for m, w in zip(attn_mask.shape, want, strict=True)):
            return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (query, key, value, attn_mask)):
        return False
    return True


def _kernel(query, key, value, attn_mask, scale, is_causal: bool):
    """The native kernel (csrc/cpu/attention.cpp): [B, H, T, E] -> [B, H, T, Ev]."""
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    if direct_ok(query, key, value, attn_mask):
        return _native._C.call_attention(query, key, value, attn_mask, scale, is_causal)
    return torch.ops.qsparse.attention_kernel(query, key, value, attn_mask, scale, is_causal)


def _float(t):
    """``t`` in float32 where it is a floating tensor (a boolean mask stays boolean)."""
    return t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None, *,
         is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` (no dropout), in float32 for float32 / bf16 / fp16 CPU inputs.

    query [..., H, T, E], key [..., Hkv, L, E], value [..., Hkv, L, Ev], attn_mask broadcastable to
    [..., H, T, L] (boolean, or additive in any float dtype) -> [..., H, T, Ev] in query's dtype.
    ``enable_gqa``: H a multiple of Hkv, query head h attends to key-value head h // (H / Hkv).
    """
    if (enable_gqa or query.shape[-3] == key.shape[-3]) and _kernel_ok(query, key, value, attn_mask, is_causal):
        return _kernel(query, key, value, attn_mask, scale, is_causal)
    if not upcasts(query):
        return F.scaled_dot_product_attention(query, key, value, attn_mask, is_causal=is_causal, scale=scale,
                                              enable_gqa=enable_gqa)
    out = F.scaled_dot_product_attention(query.float(), _float(key), _float(value), _float(attn_mask),
                                         is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    return out.to(query.dtype)


def hf_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' ``sdpa`` attention function (same arguments, same masks), in float32 for float32 /
    bf16 / fp16 CPU inputs: query [B, H, T, E], key / value [B, Hkv, L, E] -> ([B, T, H, E], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not (query.is_cpu and query.dtype in _KERNEL_DTYPES):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    # Causal as transformers' sdpa_attention_forward decides it: several positions, no mask, and the
    # call's is_causal (else the module's); the keys past the queries' count dropped.
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    causal = query.shape[2] > 1 and attention_mask is None and causal is True
    kc, vc = (key[:, :, : query.shape[2]], value[:, :, : query.shape[2]]) if causal else (key, value)
    if (kwargs.get("dropout", 0.0) == 0 and all(kwargs.get(k) is None for k in _HF_OTHER)
            and not kwargs.get("output_attentions") and _kernel_ok(query, kc, vc, attention_mask, causal)):
        out = _kernel(query, kc, vc, attention_mask, kwargs.get("scaling"), causal)
        return out.transpose(1, 2).contiguous(), None
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
