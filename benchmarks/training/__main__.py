"""Run the whole training study and write its report.

    python -m benchmarks.training            # full study (~35 min on 2 cores) -> benchmarks/training/results
    python -m benchmarks.training --quick    # tiny smoke run (< 2 min) -> bench_out/training_quick
    python -m benchmarks.training --report-only   # re-render the report from results/results.json

The report (``README.md`` with every number, ``results.json``, ``loss_curves.png``,
``grad_norms.png``, ``continue_training.png``) goes to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict

import torch

import qsparse_kernels as qk

from . import corpus as corpus_mod
from . import report, study


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.training", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model and budget (CI smoke run)")
    p.add_argument("--out", help="report folder (default: benchmarks/training/results, or bench_out/training_quick)")
    p.add_argument("--configs", nargs="*", default=list(study.CONFIGS), choices=list(study.CONFIGS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--report-only", action="store_true",
                   help="no training: re-render README.md and the plots from OUT/results.json")
    args = p.parse_args(argv)
    if "dense" not in args.configs:
        p.error("--configs must include dense (the baseline of every ratio)")
    budget = study.QUICK if args.quick else study.FULL
    here = os.path.dirname(os.path.abspath(__file__))
    out = args.out or ("bench_out/training_quick" if args.quick else os.path.join(here, "results"))
    if args.report_only:
        with open(os.path.join(out, "results.json")) as f:
            report.write(json.load(f), out)
        study.log(f"re-rendered {out}/README.md and the plots from results.json")
        return 0
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(args.threads)

    data = corpus_mod.load(max_bytes=(1 << 20) if args.quick else (24 << 20))
    study.log(f"corpus: {data.train.numel():,} train bytes ({data.n_files[0]} files), "
              f"{data.val.numel():,} validation bytes ({data.n_files[1]} files) from {data.root}")
    study.log(f"budget: {budget.shape}, {budget.steps} steps x {budget.batch} x {budget.shape.ctx} = "
              f"{budget.tokens:,} tokens per configuration")
    runs: dict[str, study.Run] = {}
    models = {}
    t_all = time.perf_counter()
    for name in args.configs:
        model = study.build(name, budget.shape)
        run = runs[name] = study.Run(name)
        study.train(model, data, budget, run, budget.steps, budget.lr, budget.warmup)
        run.final_val = study.evaluate(model, data.val, budget, budget.final_eval_batches)
        run.sparsity = study.measure_sparsity(model, data.val, budget)
        study.log(f"{name}: final validation loss {run.final_val:.4f} nats/byte, {run.seconds:.0f} s")
        models[name] = model

    # Continue-training: the trained dense model converted to Q-Sparse 50%.
    cont = study.Run("dense->qsparse-50")
    converted = study.copy.deepcopy(models["dense"])
    qk.convert(converted, qk.QSparseConfig(sparsity=0.5))
    before = runs["dense"].final_val
    jump = study.evaluate(converted, data.val, budget, budget.final_eval_batches)
    cont.curve.append((0, study.evaluate(converted, data.val, budget, budget.eval_batches)))
    study.train(converted, data, budget, cont, budget.continue_steps, budget.continue_lr, max(1, budget.warmup // 5),
                seed=1)
    cont.final_val = study.evaluate(converted, data.val, budget, budget.final_eval_batches)
    # The baseline: the dense model trained for the same extra steps with the same schedule.
    cont_dense = study.Run("dense, continued")
    dense_more = study.copy.deepcopy(models["dense"])
    study.train(dense_more, data, budget, cont_dense, budget.continue_steps, budget.continue_lr,
                max(1, budget.warmup // 5), seed=1)
    cont_dense.final_val = study.evaluate(dense_more, data.val, budget, budget.final_eval_batches)
    study.log(f"continue-training: dense {before:.4f} -> converted {jump:.4f} -> after {budget.continue_steps} steps "
              f"{cont.final_val:.4f} (dense continued the same steps: {cont_dense.final_val:.4f})")

    # Decode speed through the fast kernels, every trained model against the dense one, same run.
    for name, model in models.items():
        runs[name].decode_tok_s = study.decode_tok_s(study.inference_copy(model), data.val, budget)
        study.log(f"{name}: decode {runs[name].decode_tok_s:.1f} tokens/s")

    result = {
        "budget": asdict(budget),
        "tokens_per_config": budget.tokens,
        "corpus": {"train_bytes": data.train.numel(), "val_bytes": data.val.numel(), "files": data.n_files,
                   "python": sys.version.split()[0]},
        "backend_info": {k: v["reason"] for k, v in qk.backend_info().items()},
        "runs": {k: asdict(v) for k, v in runs.items()},
        "continue": {"dense": before, "converted": jump, "after": cont.final_val, "steps": budget.continue_steps,
                     "dense_after": cont_dense.final_val, "run": asdict(cont), "dense_run": asdict(cont_dense)},
        "total_seconds": time.perf_counter() - t_all,
        "quick": args.quick,
    }
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    report.write(result, out)
    study.log(f"wrote {out}/README.md, results.json and the plots ({result['total_seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
