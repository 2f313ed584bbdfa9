"""The HF generate() benchmark CLI runs every variant on a tiny Llama and prints its table."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from qsparse_kernels.bench import hf_generate  # noqa: E402


def test_hf_generate_cli_tiny(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                               "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 96}))
    assert hf_generate.main(["--hf-config", str(cfg), "--rounds", "2", "--new-tokens", "3",
                             "--prompt-len", "4", "9"]) == 0
    out = capsys.readouterr().out
    rows = [line.split()[:2] for line in out.splitlines() if line.split()[:1] in (["hf"], ["compact"])]
    for v in hf_generate.DEFAULT_VARIANTS:  # HF and compact rows, two prompt lengths
        assert rows.count(["hf", v]) == 2 and rows.count(["compact", v]) == 2
    assert out.count("## prompt") == 2

