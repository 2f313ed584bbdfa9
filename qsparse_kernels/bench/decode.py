"""End-to-end greedy decoding: dense vs Q-Sparse vs BitNet b1.58 (+ Q-Sparse), tokens/s.

``python -m qsparse_kernels.bench.decode`` builds a Llama-architecture model (default TinyLlama-1.1B
shapes: hidden 2048, intermediate 5632, 22 layers, 32 heads / 4 KV heads, vocabulary 32000; or
``--hf-config config.json``) with random bf16 weights, converts it with
:func:`qsparse_kernels.convert`, and times a 16-token prompt (prefill, the batched path) and 64
greedy tokens (decode, batch 1). Every variant is built from the same seed; ratios are against
the dense model measured in the same run. The output head (``lm_head``) stays a dense
``nn.Linear``, as the default conversion filter leaves it, in every variant but ``+fast-head``
(see :data:`VARIANTS`).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time

import torch

from .llama import LlamaDecoder, LlamaShape

# name -> QSparseConfig keyword arguments (None: the dense model as built), plus "fast_head": the
# dense lm_head as a QSparseLinear at sparsity 0 (the same dense bf16 math through the library's
# GEMV over the column-major weight, ~1.6x faster than F.linear here), to show what the dense head
# costs; every other variant keeps lm_head an nn.Linear, as the default conversion filter does.
VARIANTS = {
    "dense": None,
    "qsparse-0.5": dict(sparsity=0.5, weights="dense"),
    "bitnet-b1.58": dict(sparsity=0.0, weights="ternary", pack=True),
    "bitnet-b1.58+qsparse-0.6125": dict(sparsity=0.6125, weights="ternary", pack=True),
    "bitnet-b1.58+qsparse-0.6125+fast-head": dict(sparsity=0.6125, weights="ternary", pack=True, fast_head=True),
}


def build(shape: LlamaShape, variant: str, device: str, dtype=torch.bfloat16, seed: int = 0) -> LlamaDecoder:
    """The model for one variant: random N(0, 0.02) weights from ``seed``, converted in place."""
    with torch.device("meta"):
        model = LlamaDecoder(shape)
    model = model.to_empty(device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    cfg = VARIANTS[variant]
    if cfg is not None:
        import qsparse_kernels as qk

        cfg = dict(cfg)
        if cfg.pop("fast_head", False):
            qk.convert(model, qk.QSparseConfig(sparsity=0.0), filter_fn=lambda mod, name: name == "lm_head")
        qk.convert(model, qk.QSparseConfig(**cfg))
    return model.eval()


def time_variant(model: LlamaDecoder, prompt: torch.Tensor, n_new: int) -> dict:
    """Prefill seconds and decode tokens/s for one greedy generation (after a short warm-up)."""
    model.generate(prompt[:, :4], 3)
    marks = {}

    def timer(phase):
        if prompt.is_cuda:
            torch.cuda.synchronize()
        marks[phase] = time.perf_counter()

    tokens = model.generate(prompt, n_new, timer=timer)
    decode_s = marks["decode"] - marks["prefill"]
    return {
        "prefill_ms": 1e3 * (marks["prefill"] - marks["start"]),
        "decode_tok_s": (n_new - 1) / decode_s,
        "ms_per_token": 1e3 * decode_s / (n_new - 1),
        "tokens": tokens,
    }


class _Zeros(torch.nn.Module):
    """Stands in for a projection in :func:`breakdown`: returns zeros of the right shape, no work."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features

    def forward(self, x):
        return x.new_zeros((*x.shape[:-1], self.out_features))


def breakdown(model: LlamaDecoder, prompt: torch.Tensor, n_new: int) -> dict:
    """Milliseconds per decoded token spent in ``lm_head``, in the other projections and in the rest.

    Times the model as it is, then with ``lm_head`` replaced by a module that returns zeros, then
    with every projection replaced as well; the differences are the shares. Modifies ``model``.
    """
    full = time_variant(model, prompt, n_new)["ms_per_token"]
    model.lm_head = _Zeros(model.lm_head.out_features)
    no_head = time_variant(model, prompt, n_new)["ms_per_token"]
    for layer in model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                setattr(parent, name, _Zeros(child.out_features))
    rest = time_variant(model, prompt, n_new)["ms_per_token"]
    return {"total": full, "lm_head": full - no_head, "projections": no_head - rest, "rest": rest}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qsparse_kernels.bench.decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--hf-config", help="an HF config.json of a Llama-architecture model (default: TinyLlama-1.1B)")
    p.add_argument("--layers", type=int, help="override the layer count (quicker runs)")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--out", default="bench_out", help="folder for decode.csv ('' for none)")
    p.add_argument("--breakdown", action="store_true",
                   help="also split each variant's ms/token into lm_head, projections and the rest (3 more runs each)")
    args = p.parse_args(argv)

    shape = LlamaShape.from_hf_config(args.hf_config) if args.hf_config else LlamaShape()
    if args.layers:
        shape = LlamaShape(**{**shape.__dict__, "num_hidden_layers": args.layers})
    prompt = torch.randint(0, shape.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(1))
    prompt = prompt.to(args.device)
    print(f"# decode: {shape}, prompt {args.prompt_len}, {args.new_tokens} new tokens, {args.device}", file=sys.stderr)
    results = {}
    for v in ["dense"] + [v for v in args.variants if v != "dense"]:
        t0 = time.perf_counter()
        model = build(shape, v, args.device)
        built = time.perf_counter() - t0
        results[v] = time_variant(model, prompt, args.new_tokens)
        print(f"#   {v}: built in {built:.1f}s, {results[v]['decode_tok_s']:.2f} tok/s", file=sys.stderr)
        if args.breakdown:
            results[v]["split"] = breakdown(model, prompt, args.new_tokens)
        del model
    base = results["dense"]
    print(f"{'variant':<40}{'prefill ms':>12}{'x dense':>9}{'decode tok/s':>14}{'ms/token':>10}{'x dense':>9}")
    for v, r in results.items():
        print(f"{v:<40}{r['prefill_ms']:>12.1f}{base['prefill_ms'] / r['prefill_ms']:>8.2f}x"
              f"{r['decode_tok_s']:>14.2f}{r['ms_per_token']:>10.1f}{r['decode_tok_s'] / base['decode_tok_s']:>8.2f}x")
    if args.breakdown:
        print(f"\n{'ms per decoded token':<40}{'total':>9}{'lm_head':>9}{'projections':>13}{'rest':>9}")
        for v, r in results.items():
            sp = r["split"]
            print(f"{v:<40}{sp['total']:>9.1f}{sp['lm_head']:>9.1f}{sp['projections']:>13.1f}{sp['rest']:>9.1f}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "decode.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["variant", "prefill_ms", "prefill_speedup", "decode_tok_s", "ms_per_token", "decode_speedup"])
            for v, r in results.items():
                w.writerow([v, f"{r['prefill_ms']:.3f}", f"{base['prefill_ms'] / r['prefill_ms']:.3f}",
                            f"{r['decode_tok_s']:.3f}", f"{r['ms_per_token']:.3f}",
                            f"{r['decode_tok_s'] / base['decode_tok_s']:.3f}"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
