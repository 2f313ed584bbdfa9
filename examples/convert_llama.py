"""Convert a Llama model to Q-Sparse in one call, then run and generate.

    python examples/convert_llama.py                       # a tiny random Llama (no download)
    python examples/convert_llama.py --model PATH_OR_ID    # any local / hub Llama-family checkpoint

The three lines that matter::

    model = LlamaForCausalLM(config)                                        # or .from_pretrained(...)
    qk.convert(model, qk.QSparseConfig(sparsity={"*.[qkv]_proj": 0.42, ...}))
    model.generate(ids, max_new_tokens=16)

Needs the ``hf`` extra (transformers, safetensors).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import qsparse_kernels as qk

# The paper's recipe for continue-training Mistral-7B: per-projection sparsity, ~40% overall.
RECIPE = {"*.[qkv]_proj": 0.42, "*.o_proj": 0.40, "*.gate_proj": 0.40, "*.up_proj": 0.40, "*.down_proj": 0.60}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="a Llama-family checkpoint (default: a tiny random Llama)")
    ap.add_argument("--ternary", action="store_true", help="BitNet b1.58 weights, packed for inference")
    args = ap.parse_args()
    torch.manual_seed(0)

    # 1. build or load a model
    if args.model:
        model = LlamaForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32).eval()
    else:
        cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
        model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    with torch.no_grad():
        dense_logits = model(ids).logits

    # 2. convert in place (report: layers per kind, kept fraction, weight bytes per decoded token)
    config = qk.QSparseConfig(sparsity=RECIPE, weights="ternary" if args.ternary else "dense", pack=args.ternary)
    _, report = qk.convert(model, config, return_report=True)

    # 3. run and generate
    with torch.no_grad():
        logits = model(ids).logits
    out = model.generate(ids, max_new_tokens=16, do_sample=False)

    layers = {n: m for n, m in model.named_modules() if isinstance(m, (qk.nn.QSparseLinear, qk.nn.BitLinear))}
    print(f"backends: { {k: v['usable'] for k, v in qk.backend_info().items()} }")
    print(f"converted {report.converted} linear layers; lm_head stays dense ({type(model.lm_head).__name__})")
    for name in list(layers)[:7]:
        print(f"  {name}: {layers[name]}")
    print(report)
    diff = float((logits - dense_logits).norm() / dense_logits.norm())
    print(f"logits vs. dense model: relative difference {diff:.3f}")
    print(f"prompt    {ids[0].tolist()}")
    print(f"generated {out[0, ids.shape[1]:].tolist()}")
    # 4. save and load through Hugging Face: config.json gets the quantization_config of every layer
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        size = sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors"))
        again = AutoModelForCausalLM.from_pretrained(tmp)  # Q-Sparse layers rebuilt, tensors loaded into them
        with torch.no_grad():
            same = torch.equal(again(ids).logits, logits)
        print(f"save_pretrained: {size / 1e6:.2f} MB; from_pretrained gives bit-identical logits: {same}")


if __name__ == "__main__":
    main()
