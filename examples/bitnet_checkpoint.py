"""Run a Hugging Face BitNet checkpoint on this library's kernels, then add Q-Sparse on top.

    python examples/bitnet_checkpoint.py                  # a tiny BitNet checkpoint built here (no download)
    python examples/bitnet_checkpoint.py --model PATH_OR_ID --sparsity 0.6   # e.g. a published BitNet b1.58 model

Checkpoints with ``"quant_method": "bitnet"`` load in transformers with its own packed BitNet
layers (``from_pretrained`` needs ``accelerate``); one call turns them into this library's packed
``BitLinear`` (``ternary_linear``: int8 x 2-bit, exact int32 accumulation), without a float copy::

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    qk.convert(model, qk.QSparseConfig(sparsity=0.0))      # same outputs as transformers' forward
    qk.convert(model2, qk.QSparseConfig(sparsity=0.6))     # + Q-Sparse: 40% of the weight rows read

Needs the ``hf`` extra (transformers, safetensors, accelerate).
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from torch import nn
from transformers import AutoModelForCausalLM, BitNetConfig, BitNetForCausalLM
from transformers.integrations.bitnet import pack_weights, replace_with_bitnet_linear
from transformers.utils.quantization_config import BitNetQuantConfig

import qsparse_kernels as qk

TINY = dict(
    vocab_size=128,
    hidden_size=128,
    intermediate_size=320,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
)


def make_bitnet_checkpoint(path, seed: int = 0, quantization: dict | None = None, **config) -> None:
    """Save a random BitNet b1.58 model in Hugging Face's BitNet format, built by transformers itself:
    ``replace_with_bitnet_linear`` swaps in its ``BitLinear`` / ``AutoBitLinear`` layers,
    ``pack_weights`` packs each absmean-ternarized weight (uint8 ``[out / 4, in]``), and
    ``save_pretrained`` writes them with ``quantization_config = BitNetQuantConfig(...)``.
    ``quantization``: ``BitNetQuantConfig`` arguments (default: ``linear_class="bitlinear"``, offline)."""
    torch.manual_seed(seed)
    model = BitNetForCausalLM(BitNetConfig(**{**TINY, **config})).eval()
    qconf = BitNetQuantConfig(modules_to_not_convert=["lm_head"], **(quantization or {}))
    floats = {n: (m.weight.detach().clone(), m.bias) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    floats.pop("lm_head")
    replace_with_bitnet_linear(model, modules_to_not_convert=["lm_head"], quantization_config=qconf)
    for name, (w, bias) in floats.items():
        layer = model.get_submodule(name)
        g = w.abs().mean().clamp(min=1e-5)  # BitNet b1.58 absmean
        t = (w * (1 / g)).round().clamp(-1, 1)
        if type(layer).__name__ == "BitLinear":  # packed codes and 1 / mean|W|, as published
            layer.weight = pack_weights(t.clone())
            layer.weight_scale = (1 / g).reshape(1)
        elif qconf.quantization_mode == "offline":  # AutoBitLinear: unpacked codes and mean|W|
            layer.weight = nn.Parameter(t, requires_grad=False)
            layer.weight_scale = g.reshape(1)
        else:  # AutoBitLinear online: the float master weight
            layer.weight = nn.Parameter(w)
        if layer.rms_norm is not None:  # use_rms_norm=True: an RMSNorm on the layer's input
            layer.rms_norm.weight = nn.Parameter(torch.ones(layer.in_features))
        if bias is not None:  # attention_bias=True: a bias buffer (BitLinear) or Parameter (AutoBitLinear)
            b = torch.randn(layer.out_features) * 0.1
            layer.bias = b if type(layer).__name__ == "BitLinear" else nn.Parameter(b, requires_grad=False)
    model.config.quantization_config = qconf
    model.save_pretrained(path)


def load(path) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="a BitNet checkpoint (default: a tiny one built and saved here)")
    ap.add_argument("--sparsity", type=float, default=0.6, help="Q-Sparse on top of the ternary layers")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if path is None:
            path = f"{tmp}/bitnet"
            make_bitnet_checkpoint(path)
        ids = torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(0))

        # 1. transformers' own BitNet forward, then the same model on this library's kernels
        model = load(path)
        with torch.no_grad():
            hf_logits = model(ids).logits
        model, report = qk.convert(model, qk.QSparseConfig(sparsity=0.0), return_report=True)
        with torch.no_grad():
            logits = model(ids).logits
        diff = float((logits - hf_logits).norm() / hf_logits.norm())
        print(f"converted {report.layers}")
        print(f"logits vs. transformers' BitNet forward (sparsity 0, float32): relative difference {diff:.1e}")

        # 2. Q-Sparse on top: only the kept rows of each packed weight are read
        sparse, report = qk.convert(load(path), qk.QSparseConfig(sparsity=args.sparsity), return_report=True)
        print(report)
        out = sparse.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        print(f"generated {out[0, ids.shape[1]:].tolist()}")

        # 3. save_pretrained / from_pretrained of the converted model (after `import qsparse_kernels`)
        sparse.save_pretrained(f"{tmp}/converted")
        again = AutoModelForCausalLM.from_pretrained(f"{tmp}/converted")
        with torch.no_grad():
            same = torch.equal(again(ids).logits, sparse(ids).logits)
        print(f"from_pretrained of the converted model: logits bit-identical: {same}")


if __name__ == "__main__":
    main()
