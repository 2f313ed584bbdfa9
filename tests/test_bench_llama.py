"""The decode benchmark's compact Llama computes what Hugging Face's LlamaForCausalLM computes."""

import pytest
import torch

from qsparse_kernels.bench.llama import LlamaDecoder, LlamaShape


def test_matches_hf_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=101, max_position_embeddings=64, rope_theta=10000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg).eval()
    ours = LlamaDecoder(LlamaShape.from_hf_config(cfg)).eval()
    missing, unexpected = ours.load_state_dict({k.removeprefix("model."): v for k, v in hf.state_dict().items()},
                                               strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    prompt = torch.randint(0, 101, (2, 7))
    with torch.no_grad():
        want = hf(prompt).logits[:, -1]
        cache = ours.new_cache(2, 16, "cpu", torch.float32)
        got = ours.step(prompt, cache, 0)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        # one cached decode step == the full forward on the longer sequence
        nxt = got.argmax(-1, keepdim=True)
        want2 = hf(torch.cat([prompt, nxt], 1)).logits[:, -1]
        torch.testing.assert_close(ours.step(nxt, cache, 7), want2, rtol=1e-4, atol=1e-4)
        seq = prompt  # greedy decoding by full HF forwards (no cache, no end-of-sequence handling)
        for _ in range(5):
            seq = torch.cat([seq, hf(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(ours.generate(prompt, 5), seq[:, 7:])


def test_decode_cli_runs_every_variant_with_breakdown(tmp_path, capsys):
    """`python -m qsparse_kernels.bench.decode` on a tiny HF config: a row per variant and model in
    decode.csv (the model as given and the LLC row), with the spread columns, and the breakdown's
    shares add up to its total."""
    import csv
    import json

    from qsparse_kernels.bench import decode

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                               "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100}))
    out = tmp_path / "out"
    assert decode.main(["--hf-config", str(cfg), "--prompt-len", "4", "--new-tokens", "3", "--breakdown",
                        "--rounds", "2", "--llc-config", str(cfg), "--llc-layers", "3", "--llc-new-tokens", "3",
                        "--out", str(out), "--device", "cpu"]) == 0
    with open(out / "decode.csv") as f:
        rows = list(csv.DictReader(f))
    models = list(dict.fromkeys(r["model"] for r in rows))
    assert len(models) == 2
    assert [r["variant"] for r in rows if r["model"] == models[0]] == list(decode.VARIANTS)
    assert [r["variant"] for r in rows if r["model"] == models[1]] == decode.LLC_VARIANTS
    for r in rows:
        assert float(r["decode_tok_s"]) > 0 and r["rounds"] == "2" and r["attention"] == "upcast"
        assert float(r["ms_per_token_min"]) <= float(r["ms_per_token"]) <= float(r["ms_per_token_max"])
        assert float(r["decode_speedup_min"]) <= float(r["decode_speedup"]) <= float(r["decode_speedup_max"])
    dense = [r for r in rows if r["variant"] == "dense"]
    assert all(float(r["decode_speedup"]) == 1.0 for r in dense)
    # the LLC row's ternary weights: 2 bits per weight, its float rows 16 (same layer count)
    big = {r["variant"]: int(r["weight_bytes_per_token"]) for r in rows if r["model"] == models[1]}
    head = 64 * 100 * 2
    assert (big["dense"] - head) == 8 * (big["bitnet-b1.58"] - head)
    assert (out / "decode.png").exists()
    printed = capsys.readouterr().out
    assert "breakdown rounds (median" in printed  # the floor's bandwidth: measured in those rounds, with its range
    split = [line.split() for line in printed.splitlines() if line.split()[:1] == ["dense"]][-1]
    total, head, proj, rest, floor = map(float, split[1:6])
    assert abs(head + proj + rest - total) < 0.15  # each printed to 0.1 ms
    assert floor >= 0 and split[6].endswith("x")  # the projections' bandwidth floor and their ratio to it


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_choices(dtype):
    """``upcast`` (bf16 / fp16 CPU attention in float32) and ``sdpa`` compute the same logits within
    the model dtype's rounding; an unknown name is refused."""
    from qsparse_kernels.bench import decode

    shape = LlamaShape(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=50)
    up, native = (decode.build(shape, "dense", "cpu", dtype=dtype, attention=a) for a in ("upcast", "sdpa"))
    assert up.layers[0].self_attn.attend is not native.layers[0].self_attn.attend
    prompt = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = (m.step(prompt, m.new_cache(2, 9, "cpu", dtype), 0) for m in (up, native))
    torch.testing.assert_close(a, b, rtol=0, atol=8 * torch.finfo(dtype).eps * b.abs().max().item())
    with pytest.raises(ValueError, match="attention: expected one of"):
        LlamaDecoder(shape, attention="eager")


def test_llc_model_leaves_the_cache():
    """The LLC row's ternary weights are >= 4x the cache, and its float pool too."""
    from qsparse_kernels.bench.decode import LLAMA2_7B, llc_model

    for llc in (32 << 20, 105 << 20, 480 << 20):
        shape, pool = llc_model(LLAMA2_7B, llc)
        h, f = 4096, 11008
        params = 4 * h * h + 3 * h * f
        assert shape.num_hidden_layers * params // 4 >= 4 * llc
        assert (shape.num_hidden_layers - 1) * params // 4 < 4 * llc or shape.num_hidden_layers == 2
        assert pool * params * 2 >= 4 * llc and pool <= shape.num_hidden_layers


def test_variants_head_is_dense_head_unless_linear_head():
    """Every converted variant's head is a DenseHead (convert's default, and the LLC row's directly
    built ternary layers too), except the linear-head variant's, which stays the plain nn.Linear."""
    from qsparse_kernels.bench import decode
    from qsparse_kernels.nn import DenseHead

    shape = LlamaShape(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=50)
    for variant in decode.VARIANTS:
        for direct in (False, True):
            head = decode.build(shape, variant, "cpu", direct_ternary=direct).lm_head
            want = torch.nn.Linear if variant == "dense" or variant.endswith("+linear-head") else DenseHead
            assert type(head) is want, (variant, direct, type(head))
