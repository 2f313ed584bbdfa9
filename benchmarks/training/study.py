"""The configurations, the training loop and the measurements of the study.

Every configuration starts from the same dense initialisation (same seed), is converted with
:func:`qsparse_kernels.convert` before training (so the library's modules carry the sparsity and
the STE), and sees the same batches in the same order.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import qsparse_kernels as qk
from qsparse_kernels.nn import BitLinear, QSparseLinear

from . import corpus as corpus_mod
from .model import ByteLM, ModelShape

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")

# name -> QSparseConfig keyword arguments (None: the dense model); "no_ste" marks the ablation.
CONFIGS: dict[str, dict | None] = {
    "dense": None,
    "qsparse-40": dict(sparsity=0.4),
    "qsparse-40-no-ste": dict(sparsity=0.4),
    "qsparse-60": dict(sparsity=0.6),
    "bitnet-b1.58": dict(sparsity=0.0, weights="ternary"),
    "bitnet-b1.58+qsparse-61.25": dict(sparsity=0.6125, weights="ternary"),
    "block-qsparse-16:32": dict(block=(16, 32)),
}


@dataclass(frozen=True)
class Budget:
    """Model size and token budget (the same for every configuration)."""

    shape: ModelShape
    steps: int
    batch: int
    lr: float
    warmup: int
    eval_every: int
    eval_batches: int
    final_eval_batches: int
    grad_every: int
    continue_steps: int
    continue_lr: float
    decode_tokens: int

    @property
    def tokens(self) -> int:
        return self.steps * self.batch * self.shape.ctx


FULL = Budget(ModelShape(256, 4, 4, 1024, 128), steps=600, batch=16, lr=2e-3, warmup=50, eval_every=50,
              eval_batches=8, final_eval_batches=48, grad_every=25, continue_steps=120, continue_lr=1e-3,
              decode_tokens=64)
QUICK = Budget(ModelShape(64, 2, 2, 256, 64), steps=30, batch=8, lr=3e-3, warmup=5, eval_every=10, eval_batches=2,
               final_eval_batches=4, grad_every=5, continue_steps=10, continue_lr=1e-3, decode_tokens=16)


# ---- the no-STE ablation: the gradient of x is masked like the forward ----
class _TopKMaskedGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, k):
        xs = qk.topk_sparsify(x.detach(), k)
        ctx.save_for_backward(xs != 0)
        return xs

    @staticmethod
    def backward(ctx, g):
        (mask,) = ctx.saved_tensors
        return g * mask, None


class NoSTEQSparseLinear(QSparseLinear):
    """``QSparseLinear`` whose backward does not pass the gradient through the dropped entries."""

    def forward(self, x):
        return F.linear(_TopKMaskedGrad.apply(x, self.kept(x.shape[-1])), self.weight, self.bias)


def build(name: str, shape: ModelShape, seed: int = 0) -> ByteLM:
    torch.manual_seed(seed)
    model = ByteLM(shape)
    cfg = CONFIGS[name]
    if cfg is not None:
        qk.convert(model, qk.QSparseConfig(**cfg))
    if name.endswith("no-ste"):
        for m in model.modules():
            if type(m) is QSparseLinear:
                m.__class__ = NoSTEQSparseLinear
    return model


def log(msg: str) -> None:
    print(f"[training {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@torch.no_grad()
def evaluate(model: ByteLM, data: torch.Tensor, budget: Budget, n_batches: int) -> float:
    """Mean validation loss (nats/byte) over the first ``n_batches`` fixed windows."""
    model.eval()
    gen = torch.Generator().manual_seed(1234)
    it = corpus_mod.batches(data, budget.batch, budget.shape.ctx, gen)
    total = 0.0
    for _ in range(n_batches):
        x, y = next(it)
        total += float(F.cross_entropy(model(x).flatten(0, 1), y.flatten()))
    model.train()
    return total / n_batches


def _layer_grad_norms(model: ByteLM) -> list[float]:
    """Per block: the norm of all its projection weights' gradients."""
    out = []
    for layer in model.layers:
        sq = 0.0
        for m in layer.modules():
            w = getattr(m, "weight", None)
            if isinstance(m, (torch.nn.Linear, QSparseLinear, BitLinear)) and w is not None and w.grad is not None:
                sq += float(w.grad.float().square().sum())
        out.append(math.sqrt(sq))
    return out


@dataclass
class Run:
    name: str
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, val loss)
    train_curve: list[tuple[int, float]] = field(default_factory=list)
    grad_norms: list[tuple[int, list[float]]] = field(default_factory=list)
    final_val: float = float("nan")
    seconds: float = 0.0
    sparsity: dict = field(default_factory=dict)
    decode_tok_s: float = float("nan")


def train(model: ByteLM, data: corpus_mod.Corpus, budget: Budget, run: Run, steps: int, lr: float, warmup: int,
          seed: int = 0, step0: int = 0) -> None:
    """AdamW, linear warm-up then cosine decay to 10%; records curves and gradient norms in ``run``."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    )
    it = corpus_mod.batches(data.train, budget.batch, budget.shape.ctx, torch.Generator().manual_seed(seed))
    model.train()
    t0 = time.perf_counter()
    for s in range(steps):
        x, y = next(it)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if s % budget.grad_every == 0:
            run.grad_norms.append((step0 + s, _layer_grad_norms(model)))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if s % 10 == 0:
            run.train_curve.append((step0 + s, loss.item()))
        if (s + 1) % budget.eval_every == 0 or s + 1 == steps:
            v = evaluate(model, data.val, budget, budget.eval_batches)
            run.curve.append((step0 + s + 1, v))
            rate = (s + 1) * budget.batch * budget.shape.ctx / (time.perf_counter() - t0)
            log(f"{run.name}: step {step0 + s + 1}/{step0 + steps} train {float(loss):.3f} val {v:.3f} "
                f"({rate:,.0f} tokens/s)")
    run.seconds += time.perf_counter() - t0


@torch.no_grad()
def measure_sparsity(model: ByteLM, data: torch.Tensor, budget: Budget, n_batches: int = 2) -> dict:
    """Per projection type: the fraction of exact zeros in the layer's input ("natural", e.g. after
    squared ReLU) and in what the layer multiplies after its top-K / N:M selection ("effective")."""
    stats: dict[str, list[float]] = {}
    hooks = []

    def hook(mod, args, _out, proj):
        x = args[0]
        natural = float((x == 0).float().mean())
        if isinstance(mod, (QSparseLinear, BitLinear)):
            block = getattr(mod, "block", None)
            if block is not None:
                xs = qk.block_topk_sparsify(x, block[0], block[1])
            else:
                k = mod.kept(x.shape[-1])
                xs = x if k is None else qk.topk_sparsify(x, k)
            effective = float((xs == 0).float().mean())
        else:
            effective = natural
        stats.setdefault(proj + ":natural", []).append(natural)
        stats.setdefault(proj + ":effective", []).append(effective)

    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in PROJECTIONS:
            hooks.append(mod.register_forward_hook(lambda m, a, o, p=leaf: hook(m, a, o, p)))
    evaluate(model, data, budget, n_batches)
    for h in hooks:
        h.remove()
    return {k: sum(v) / len(v) for k, v in stats.items()}


def inference_copy(model: ByteLM) -> ByteLM:
    """An eval-mode copy for decoding: ternary layers packed (2-bit weights, ``ternary_linear``)."""
    m = copy.deepcopy(model).eval()
    for mod in m.modules():
        if isinstance(mod, BitLinear):
            mod.pack()
    return m


def decode_tok_s(model: ByteLM, data: torch.Tensor, budget: Budget, reps: int = 3) -> float:
    """Greedy KV-cached decoding at batch 1 (best of ``reps``), tokens/s."""
    prompt = data[:16].long()[None]
    n = min(budget.decode_tokens, budget.shape.ctx - 16)
    model.generate(prompt, 4)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        model.generate(prompt, n)
        best = min(best, time.perf_counter() - t0)
    return n / best
