"""``DenseHead`` (qsparse_kernels/nn/dense_head.py): the dense output head that ``convert`` makes from
``lm_head``: same Parameters, layout, state_dict and tying as the ``nn.Linear``; the library's dense
GEMV in CPU inference at few rows, ``F.linear`` everywhere else; ``unconvert`` turns it back.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qsparse_kernels as qk
from qsparse_kernels.nn import DenseHead, QSparseLinear
from tests.numerics import FLOAT_DTYPES, assert_parity

pytestmark = pytest.mark.skipif(not qk.backend_info()["cpu"]["usable"], reason="cpu backend not built")


class TinyLM(nn.Module):
    def __init__(self, d=24, vocab=50, tied=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.proj = nn.Linear(d, d)
        self.lm_head = nn.Linear(d, vocab, bias=not tied)
        if tied:
            self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        return self.lm_head(self.proj(self.embed(ids)))


@pytest.mark.parametrize("tied", [False, True])
def test_convert_makes_the_head_a_dense_head_sharing_parameters(tied):
    model = TinyLM(tied=tied).eval()
    old = model.lm_head
    keys = list(model.state_dict())
    ids = torch.randint(0, 50, (1, 1))
    with torch.no_grad():
        want = model(ids)
    qk.convert(model, qk.QSparseConfig(sparsity=0.0))
    head = model.lm_head
    assert type(head) is DenseHead and isinstance(model.proj, QSparseLinear)
    assert head.weight is old.weight and head.bias is old.bias and head.weight.is_contiguous()
    assert (head.weight is model.embed.weight) == tied
    assert list(model.state_dict()) == keys and not head.training
    with torch.no_grad():
        got = model(ids)
    assert_parity(got, want.double())
    back = qk.unconvert(model)
    assert type(back.lm_head) is nn.Linear and back.lm_head.weight is old.weight


def test_fast_head_false_keeps_the_linear():
    model = qk.convert(TinyLM(), qk.QSparseConfig(sparsity=0.5), fast_head=False)
    assert type(model.lm_head) is nn.Linear


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("lead", [(1,), (2,), (1, 3), (5,), (2, 4)])
def test_inference_parity_at_every_row_count(dtype, lead, gen):
    lin = nn.Linear(63, 4097, dtype=dtype)
    head = DenseHead.from_linear(lin).eval()
    x = torch.randn(*lead, 63, generator=gen).to(dtype)
    with torch.no_grad():
        y = head(x)
        plain = lin(x)
    assert y.shape == plain.shape and y.dtype == dtype
    assert_parity(y, F.linear(x.double(), lin.weight.double(), lin.bias.double()), plain)
    rows = x.numel() // 63
    if rows <= qk.nn.dense_head._MAX_ROWS[dtype]:  # the library's kernel: exactly the op's result
        assert torch.equal(y, qk.sparse_linear(x, lin.weight, 63, lin.bias, backend="cpu"))
    else:  # torch's GEMM, exactly nn.Linear
        assert torch.equal(y, plain)


def test_autograd_and_training_take_f_linear(gen):
    lin = nn.Linear(40, 30)
    head = DenseHead.from_linear(lin)
    x = torch.randn(1, 40, generator=gen, requires_grad=True)
    y = head(x)
    assert torch.equal(y, F.linear(x, lin.weight, lin.bias))
    y.sum().backward()
    assert lin.weight.grad is not None and x.grad is not None


def test_autocast_casts_like_nn_linear(gen):
    lin = nn.Linear(40, 30)
    head = DenseHead.from_linear(lin).eval()
    x = torch.randn(1, 40, generator=gen)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y, plain = head(x), lin(x)
    assert y.dtype == plain.dtype == torch.bfloat16
    ref64 = F.linear(*(t.bfloat16().double() for t in (x, lin.weight, lin.bias)))
    assert_parity(y, ref64, plain)


def test_hf_from_pretrained_gets_the_dense_head(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = qk.convert(LlamaForCausalLM(cfg).eval(), qk.QSparseConfig(sparsity=0.5))
    assert type(model.lm_head) is DenseHead
    model.save_pretrained(tmp_path)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded.lm_head) is DenseHead
    ids = torch.randint(0, 96, (1, 6))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
