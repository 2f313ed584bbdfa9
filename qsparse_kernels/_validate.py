"""Argument checks shared by every op: the one place where bad input is turned away.

Every check runs before any kernel (and in the fake implementations, so ``torch.compile``
reports the same errors at trace time). Messages name the op and the argument.
"""

from __future__ import annotations

import math
import operator

import torch

from .layout import packed_cols

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_FLOAT_NAMES = "float32, bfloat16 or float16"


def _err(cls: type[Exception], op: str, msg: str) -> Exception:
    return cls(f"qsparse_kernels.{op}: {msg}")


def _is_bool(v) -> bool:
    """``bool`` and numpy's bool scalar (which has ``__float__``, so ``float()`` would take it)."""
    return isinstance(v, bool) or (type(v).__module__ == "numpy" and type(v).__name__ in ("bool", "bool_"))


def as_int(op: str, name: str, v):
    """``v`` as a Python ``int``: anything ``operator.index`` accepts (``int``, numpy integers), a
    ``SymInt`` as is; ``bool`` and tensors are refused (a tensor would cost a host read per call)."""
    if type(v) is int or isinstance(v, torch.SymInt):
        return v
    if not _is_bool(v) and not isinstance(v, torch.Tensor):
        try:
            return operator.index(v)
        except TypeError:
            pass
    raise _err(TypeError, op, f"{name} must be an int, got {type(v).__name__}")


def as_float(op: str, name: str, v) -> float:
    """``v`` as a Python ``float``: a real number (``int``, ``float``, numpy floats and integers);
    ``bool``, strings and tensors are refused."""
    if type(v) is float:
        return v
    if not _is_bool(v) and not isinstance(v, (str, bytes, torch.Tensor)) and (
        hasattr(v, "__float__") or hasattr(v, "__index__")
    ):
        try:
            return float(v) if hasattr(v, "__float__") else float(operator.index(v))
        except (TypeError, ValueError, OverflowError):
            pass
    raise _err(TypeError, op, f"{name} must be a float, got {type(v).__name__}")


# Largest tensor any op accepts or produces: the GPU kernels index with 32-bit offsets. Checked on
# shapes alone, before anything is allocated or launched.
MAX_NUMEL = 2**31 - 1


# ternary_linear accumulates x_q @ t^T in int32 (SPEC 7). |x_q| <= 127 (absmax quantization never
# reaches -128: |x| * (127 / max|x|) <= 127 up to rounding) and |t| <= 1, so |acc| <= 127 d, which
# fits int32 exactly for d <= floor((2**31 - 1) / 127) = 16,909,320 (127 d = 2,147,483,640). The
# kernels that accumulate codes t + 1 wrap modulo 2**32 and subtract sum(x_q), exact whenever the
# true accumulator fits. csrc/include/qsk/checks.h (kMaxTernaryD) holds the same bound.
MAX_TERNARY_D = (2**31 - 1) // 127


def numel_fits(op: str, name: str, numel) -> None:
    if numel > MAX_NUMEL:
        raise _err(ValueError, op, f"{name} has {numel} elements, more than the supported 2**31 - 1")


# Largest feature count (d, the block size m, out_features): the kernels store feature indices as
# int32 (csrc/cpu select_topk and the ternary row plan, the CUDA / Triton kept lists). A tensor
# with no element passes numel_fits whatever its last dim, so the dims are checked on their own.
MAX_DIM = 2**31 - 1


def dim_fits(op: str, name: str, v) -> None:
    if v > MAX_DIM:
        raise _err(ValueError, op, f"{name} = {v} is above the supported 2**31 - 1 (int32 feature indices)")


def tensor(op: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise _err(TypeError, op, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    numel_fits(op, name, t.numel())


def _rows(x: torch.Tensor) -> int:
    n = 1
    for s in x.shape[:-1]:
        n *= s
    return n


def float_tensor(op: str, name: str, t, min_dim: int = 1) -> None:
    tensor(op, name, t)
    if t.dtype not in FLOAT_DTYPES:
        raise _err(TypeError, op, f"{name} must be {_FLOAT_NAMES}, got {t.dtype}")
    if t.dim() < min_dim:
        raise _err(ValueError, op, f"{name} must have at least {min_dim} dimension(s), got shape {tuple(t.shape)}")
    if t.dim():
        dim_fits(op, f"{name}.shape[-1]", t.shape[-1])


def integer(op: str, name: str, v, lo: int, hi: int | None = None, hi_desc: str = ""):
    """``v`` as an ``int`` (:func:`as_int`) in ``[lo, hi]``; returns it."""
    v = as_int(op, name, v)
    if v < lo or (hi is not None and v > hi):
        rng = f"[{lo}, {hi}]" + (f" ({hi_desc})" if hi_desc else "") if hi is not None else f">= {lo}"
        raise _err(ValueError, op, f"{name} must be in {rng}, got {v}")
    return v


def same_device(op: str, ref_name: str, ref: torch.Tensor, name: str, t: torch.Tensor) -> None:
    if t.device != ref.device:
        raise _err(ValueError, op, f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def sparsity(op: str, s) -> float:
    """``s`` as a ``float`` (:func:`as_float`) in ``[0, 1)``; returns it."""
    try:
        s = as_float(op, "sparsity", s)
    except TypeError:
        raise _err(TypeError, op, f"sparsity must be a float in [0, 1), got {type(s).__name__}") from None
    if not (0.0 <= s < 1.0):
        raise _err(ValueError, op, f"sparsity must be in [0, 1), got {s}")
    return s


def _holds_data(t: torch.Tensor) -> bool:
    """Whether ``t``'s values can be read here: not meta, not a fake tensor, not while compiling."""
    return (
        t.device.type != "meta"
        and not isinstance(t, torch._subclasses.FakeTensor)
        and not torch.compiler.is_compiling()
    )


def finite_weight(op: str, name: str, weight) -> None:
    """Weights must be finite: a NaN / Inf in the weight row of a feature that top-K drops
    is skipped by the sparse path but reaches every output on the dense path, so the same token's
    output would depend on the batch size. Checked once where a weight enters a layer (``convert``,
    ``from_linear``, ``to_fast_layout``, ``BitLinear.pack``, checkpoint loading), never per call.
    Reads the values (one pass, one host sync); skipped for meta and fake tensors."""
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or not _holds_data(weight):
        return
    bad = ~torch.isfinite(weight.detach())
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise _err(
            ValueError,
            op,
            f"{name} holds {int(bad.sum())} non-finite value(s) (NaN or +-Inf), the first at index {first}; "
            "weights must be finite (the sparse and dense paths would disagree on them)",
        )


# ---- per-op checks (shape-only, so the fakes can run them too) ----


def topk_sparsify(x, k) -> int:
    """Checks the arguments; returns ``k`` as an ``int``."""
    op = "topk_sparsify"
    float_tensor(op, "x", x)
    return integer(op, "k", k, 0, x.shape[-1], "d = x.shape[-1]")


def block_topk_sparsify(x, n, m) -> tuple[int, int]:
    """Checks the arguments; returns ``(n, m)`` as ``int``."""
    op = "block_topk_sparsify"
    float_tensor(op, "x", x)
    m = integer(op, "m", m, 1, MAX_DIM, "int32 feature indices")
    n = integer(op, "n", n, 0, m, "m")
    if x.shape[-1] % m != 0:
        raise _err(ValueError, op, f"x.shape[-1] = {x.shape[-1]} must be divisible by m = {m}")
    return n, m


def _bias(op: str, bias, x: torch.Tensor, out_features: int, dtype: torch.dtype) -> None:
    if bias is None:
        return
    tensor(op, "bias", bias)
    if bias.dtype != dtype:
        raise _err(TypeError, op, f"bias must have dtype {dtype}, got {bias.dtype}")
    if tuple(bias.shape) != (out_features,):
        raise _err(ValueError, op, f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
    same_device(op, "x", x, "bias", bias)


def sparse_linear(x, weight, k, bias) -> int:
    """Checks the arguments; returns ``k`` as an ``int``."""
    op = "sparse_linear"
    float_tensor(op, "x", x)
    tensor(op, "weight", weight)
    if weight.dtype != x.dtype:
        raise _err(TypeError, op, f"weight must have the dtype of x ({x.dtype}), got {weight.dtype}")
    if weight.dim() != 2:
        raise _err(ValueError, op, f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    dim_fits(op, "weight.shape[0]", weight.shape[0])
    if weight.shape[1] != x.shape[-1]:
        raise _err(
            ValueError, op, f"weight.shape[1] = {weight.shape[1]} must equal x.shape[-1] = {x.shape[-1]}"
        )
    same_device(op, "x", x, "weight", weight)
    k = integer(op, "k", k, 0, x.shape[-1], "d = x.shape[-1]")
    _bias(op, bias, x, weight.shape[0], x.dtype)
    numel_fits(op, "the output", _rows(x) * weight.shape[0])
    return k


def quantize_act_int8(x) -> None:
    float_tensor("quantize_act_int8", "x", x)


def quantize_weight_ternary(weight) -> None:
    op = "quantize_weight_ternary"
    float_tensor(op, "weight", weight)
    if weight.dim() != 2:
        raise _err(ValueError, op, f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")


def pack_ternary(t) -> None:
    op = "pack_ternary"
    tensor(op, "t", t)
    if t.dtype != torch.int8:
        raise _err(TypeError, op, f"t must be int8 with values in {{-1, 0, 1}}, got {t.dtype}")
    if t.dim() != 2:
        raise _err(ValueError, op, f"t must be 2-D [out_features, in_features], got shape {tuple(t.shape)}")


def packed_weight(op: str, packed, in_features: int, out_features) -> int:
    """Checks ``packed`` against ``[in_features, ceil(out_features / 4)]``; returns ``out_features``."""
    tensor(op, "packed", packed)
    if packed.dtype != torch.uint8:
        raise _err(TypeError, op, f"packed must be uint8, got {packed.dtype}")
    out_features = integer(op, "out_features", out_features, 0, MAX_DIM, "int32 feature indices")
    want = (in_features, packed_cols(out_features))
    if tuple(packed.shape) != want:
        raise _err(
            ValueError,
            op,
            f"packed must have shape [in_features, ceil(out_features / 4)] = {list(want)}, "
            f"got {list(packed.shape)}",
        )
    return out_features


def unpack_ternary(packed, out_features) -> int:
    """Checks the arguments; returns ``out_features`` as an ``int``."""
    op = "unpack_ternary"
    tensor(op, "packed", packed)
    if packed.dim() != 2:
        raise _err(
            ValueError, op, f"packed must be 2-D [in_features, ceil(out_features / 4)], got shape {tuple(packed.shape)}"
        )
    return packed_weight(op, packed, packed.shape[0], out_features)


def weight_scale(op: str, scale, x: torch.Tensor) -> None:
    tensor(op, "scale", scale)
    if scale.dtype != torch.float32:
        raise _err(TypeError, op, f"scale must be float32, got {scale.dtype}")
    if scale.numel() != 1 or scale.dim() > 1:
        raise _err(ValueError, op, f"scale must be a scalar tensor (shape () or (1,)), got shape {tuple(scale.shape)}")
    same_device(op, "x", x, "scale", scale)
    # The value check needs the data: cheap on CPU; on an accelerator it would force a host sync
    # in the hot path, so modules check the scale once when the weight is loaded instead.
    if (
        scale.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and not isinstance(scale, torch._subclasses.FakeTensor)
    ):
        v = scale.item()  # one element (checked above)
        if not math.isfinite(v) or v <= 0.0:
            raise _err(ValueError, op, f"scale must be finite and > 0, got {v}")


def ternary_linear(x, packed, scale, out_features, k, bias) -> tuple[int, int | None]:
    """Checks the arguments; returns ``(out_features, k)`` as ``int`` (``k`` may be None)."""
    op = "ternary_linear"
    float_tensor(op, "x", x)
    if x.shape[-1] > MAX_TERNARY_D:
        raise _err(
            ValueError,
            op,
            f"x.shape[-1] = {x.shape[-1]} is above {MAX_TERNARY_D}, the largest in_features whose int32 "
            "accumulator cannot overflow (127 * in_features must fit in int32)",
        )
    out_features = packed_weight(op, packed, x.shape[-1], out_features)
    same_device(op, "x", x, "packed", packed)
    weight_scale(op, scale, x)
    if k is not None:
        k = integer(op, "k", k, 0, x.shape[-1], "d = x.shape[-1]")
    _bias(op, bias, x, out_features, x.dtype)
    numel_fits(op, "the output", _rows(x) * out_features)
    return out_features, k
