"""The training study (benchmarks/training): its --quick run end to end, and the no-STE ablation."""

import json
import math

import torch

import qsparse_kernels as qk
from benchmarks.training import __main__ as study_main
from benchmarks.training import study


def test_quick_study_runs_and_reports(tmp_path):
    threads = torch.get_num_threads()
    try:
        assert study_main.main(["--quick", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    for f in ("README.md", "results.json", "loss_curves.png", "grad_norms.png", "continue_training.png"):
        assert (tmp_path / f).stat().st_size > 0, f
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res["runs"]) == set(study.CONFIGS)
    d = study.QUICK.shape.d_model
    for name, run in res["runs"].items():
        vals = [v for _, v in run["curve"]]
        assert all(math.isfinite(v) for v in vals) and vals[-1] < vals[0], (name, vals)
        assert math.isfinite(run["final_val"]) and run["final_val"] < math.log(256)
        assert run["decode_tok_s"] > 0
    # What each projection multiplies has the configured sparsity (the top-K keeps exactly k).
    for name, s in (("qsparse-40", 0.4), ("qsparse-60", 0.6), ("bitnet-b1.58+qsparse-61.25", 0.6125)):
        want = 1 - qk.sparsity_to_k(d, s) / d
        got = res["runs"][name]["sparsity"]["q_proj:effective"]
        assert abs(got - want) < 1e-6, (name, got, want)
    assert abs(res["runs"]["block-qsparse-16:32"]["sparsity"]["k_proj:effective"] - 0.5) < 1e-6
    assert res["runs"]["dense"]["sparsity"]["q_proj:effective"] == 0.0
    c = res["continue"]
    assert all(math.isfinite(c[k]) for k in ("dense", "converted", "after", "dense_after"))
    text = (tmp_path / "README.md").read_text()
    assert "QUICK" in text and "| qsparse-40 |" in text


def test_no_ste_masks_the_input_gradient(gen):
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 8, bias=False)
    ste = qk.nn.QSparseLinear.from_linear(lin, sparsity=0.5)
    no_ste = study.NoSTEQSparseLinear.from_linear(torch.nn.Linear(32, 8, bias=False), sparsity=0.5)
    no_ste.weight.data.copy_(ste.weight.data)
    x = torch.randn(3, 32, generator=gen)
    kept = qk.topk_sparsify(x, 16) != 0
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.testing.assert_close(ste(xa), no_ste(xb))
    ste(xa).sum().backward()
    no_ste(xb).sum().backward()
    assert torch.equal(xb.grad[~kept], torch.zeros_like(xb.grad[~kept]))  # no gradient through dropped entries
    assert (xa.grad[~kept] != 0).any()  # the STE passes it
    torch.testing.assert_close(xa.grad[kept], xb.grad[kept])
