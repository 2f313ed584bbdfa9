"""benchmarks/bench_gpu.py and benchmarks/gpu_roofline.py without a GPU: each row is printed and
appended to the CSV as soon as it is measured (a fake timer stands in for CUDA events), and the
roofline table takes the measured columns from those rows."""

import csv
import io

from benchmarks import bench_gpu, gpu_roofline

META = {"in_features": 4096, "out_features": 14336, "dtype": "bf16", "device": "fake", "torch": "t", "triton": "tr"}


def test_rows_printed_and_appended_as_measured(tmp_path):
    path = tmp_path / "bench_gpu.csv"
    out = io.StringIO()
    sink = bench_gpu.RowSink(str(path), out=out)
    seen = []  # (rows in the CSV, lines printed) when each timing starts

    def timer(fns, reps, warmup):
        for f in fns:
            f()
        lines = path.read_text().splitlines() if path.exists() else []
        seen.append((max(0, len(lines) - 1), len(out.getvalue().splitlines()) - 2))
        return [0.0288] * reps if len(seen) <= 2 else [0.0144] * reps  # ms: cuBLAS first, then 2x faster

    calls = []
    cases = [
        ("F.linear (cuBLAS)", "torch", 0.0, 1, 117_440_512, lambda w: (lambda: calls.append(w)), [("a",), ("b",)]),
        ("sparse_linear", "cuda", 0.5, 1, 58_720_256, lambda w: (lambda: calls.append(w)), [("c",)]),
    ]
    bench_gpu.measure(cases, 20, 2, 4300.0, META, sink, timer=timer, graph=lambda f: f, cleanup=lambda: None)
    assert seen == [(0, 0), (1, 1), (2, 2), (3, 3)]  # every earlier row was on disk and printed
    rows = list(csv.DictReader(path.open()))
    assert [(r["kernel"], r["mode"]) for r in rows] == [
        ("F.linear (cuBLAS)", "graph"), ("F.linear (cuBLAS)", "eager"), ("sparse_linear", "graph"),
        ("sparse_linear", "eager"),
    ]  # fmt: skip
    assert abs(float(rows[2]["speedup_vs_F.linear"]) - 2.0) < 1e-9 and abs(float(rows[2]["p50_us"]) - 14.4) < 1e-9
    assert "met" in out.getvalue().splitlines()[-1]  # the 1.8x target at s = 0.5

    table = gpu_roofline.fill(gpu_roofline.rows(), sink.rows)
    (r,) = [r for r in table if r["op"] == "sparse_linear" and r["sparsity"] == "0.5" and r["M"] == 1
            and r["out_features"] == 14336]  # fmt: skip
    assert r["measured us (graph)"] == "14.40" and r["measured x cuBLAS (eager)"] == "2.00x"
    assert "| 14.40 | 2.00x |" in gpu_roofline.render(table)


def test_roofline_model():
    rows = {(r["op"], r["sparsity"], r["M"], r["out_features"], r["in_features"]): r for r in gpu_roofline.rows()}
    dense = rows["F.linear (cuBLAS)", "-", 1, 14336, 4096]
    assert abs(dense["floor us"] - 28.79) < 0.05  # 117.5 MB at 85% of 4.8 TB/s
    sparse = rows["sparse_linear", "0.5", 1, 14336, 4096]
    assert abs(sparse["floor us"] - 13.66) < 0.05 and sparse["launches"] == 1
    tern = rows["ternary_linear", "-", 1, 14336, 4096]
    assert abs(tern["floor us"] - 3.42) < 0.05
    # M = 16 independent kept sets at s = 0.5 cover nearly every feature
    assert rows["sparse_linear", "0.5", 16, 14336, 4096]["MB read"] > 0.99 * dense["MB read"]
