"""FLOP counts, MFU and the machine probe behind `rlhf doctor` (pipeline/models/throughput.py)."""
import json
import math

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import ModelConfig
from pipeline.models import loading
from pipeline.models.throughput import (
    TYPICAL_MFU,
    DecoderShape,
    count_matmul_params,
    decoder_shape,
    estimate_line,
    forward_flops,
    lm_train_flops,
    lm_train_flops_per_token,
    lora_backward_flops,
    mfu,
    pair_train_flops,
    probe_matmul,
)

SHAPE = DecoderShape(matmul_params=1000, layers=2, width=8, vocab=10)


def test_forward_flops_by_hand():
    # 3 tokens, each: 2 x 1,000 + 4 x 2 layers x 8 x 2 attended = 2,128; one logit row: 2 x 8 x 10 = 160.
    assert forward_flops(SHAPE, tokens=3, attended=2) == 3 * 2128
    assert forward_flops(SHAPE, tokens=3, attended=2, logits=1) == 3 * 2128 + 160


def test_lora_backward_flops_by_hand():
    # 1 of 2 layers trained: 2 x 500 + 8 x 1 x 8 x 2 = 1,128 per token; 3 tokens: 3,384; one logit row: 160;
    # 10 LoRA weights: 4 x 10 x 3 = 120.
    assert lora_backward_flops(SHAPE, 3, 2, trained_layers=1, lora_params=10, logits=1) == 3384 + 160 + 120
    # every layer trained and nothing else: the matmuls' input gradients cost their forward, the attention's
    # backward twice its forward: the forward plus its attention term once more, 3 x 4 x 2 x 8 x 2 = 384
    assert lora_backward_flops(SHAPE, 3, 2, trained_layers=2, lora_params=0) == forward_flops(SHAPE, 3, 2) + 384
    assert forward_flops(SHAPE, 3, 2) + 384 == 3 * (2000 + 8 * 2 * 8 * 2)


def test_mfu_by_hand():
    assert mfu(1.2e12, 10.0, 0.3e12) == pytest.approx(0.4)  # 1.2e12 / (10 x 0.3e12)
    assert math.isnan(mfu(1.0, 0.0, 1.0)) and math.isnan(mfu(1.0, 1.0, 0.0))


def test_matmul_params_count_the_logical_weights_of_a_4bit_model(tiny_path):
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tiny_path)
    nf4, _, _ = loading.load_base(ModelConfig(name="embedded:tiny-random-llama", load_in_4bit=True,
                                              compute_dtype="float32"))
    cfg = plain.config
    # per layer: q, k, v, o (d x d, k/v by the kv heads' share) and gate, up, down (d x ff)
    kv = cfg.hidden_size * cfg.num_key_value_heads // cfg.num_attention_heads
    per_layer = 2 * cfg.hidden_size ** 2 + 2 * cfg.hidden_size * kv + 3 * cfg.hidden_size * cfg.intermediate_size
    assert count_matmul_params(plain) == cfg.num_hidden_layers * per_layer
    assert count_matmul_params(nf4) == count_matmul_params(plain)  # packed 4-bit bytes are not the count
    shape = decoder_shape(nf4)
    assert (shape.layers, shape.width, shape.vocab) == (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size)


def test_probe_matmul_measures_a_positive_rate():
    import torch

    rate = probe_matmul(torch.float32, size=64, seconds=0.01)
    assert math.isfinite(rate) and rate > 0


def test_measured_peak_probes_cpu_and_leaves_unprobed_devices_nan(monkeypatch):
    import torch

    from pipeline.models import throughput

    seen = []
    monkeypatch.setattr(throughput, "probe_matmul", lambda dtype, **kw: seen.append(kw) or 5.0)
    monkeypatch.delenv("RLHF_PROBE_SECONDS", raising=False)
    assert throughput.measured_peak(torch.float32, torch.device("cpu")) == 5.0
    assert seen[0] == {"seconds": throughput.STAGE_PROBE_SECONDS}
    monkeypatch.setenv("RLHF_PROBE_SECONDS", "0.25")
    assert throughput.measured_peak(torch.bfloat16, torch.device("cuda")) == 5.0  # not run: probe faked
    assert seen[1] == {"size": throughput.GPU_PROBE_SIZE, "seconds": 0.25, "device": torch.device("cuda")}
    for bad in ("0", "-1", "soon"):
        monkeypatch.setenv("RLHF_PROBE_SECONDS", bad)
        with pytest.raises(ValueError, match="RLHF_PROBE_SECONDS"):
            throughput.measured_peak(torch.float32, torch.device("cpu"))
    assert math.isnan(throughput.measured_peak(torch.float32, torch.device("meta")))
    assert probe_matmul(torch.float32, size=32, seconds=0.01, device="cpu") > 0


def test_doctor_prints_the_machine_and_writes_json(tmp_path):
    out = tmp_path / "doctor.json"
    r = CliRunner().invoke(main, ["doctor", "--seconds", "0.05", "--size", "64", "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "matmul 64x64 float32:" in r.output and "model.compute_dtype=auto: compute dtype" in r.output
    saved = json.loads(out.read_text())
    assert set(saved["matmul_flops_per_s"]) == {"float32", "bfloat16"} and saved["matmul_size"] == 64


def test_phase_flops_by_hand():
    from pipeline.models.throughput import (
        generate_flops,
        lora_train_flops,
        sequence_flops,
    )

    # prompt 4, response 2: prefill 4 x (2,000 + 4 x 2 x 8 x 4) = 4 x 2,256 = 9,024; decode 2 tokens attending to
    # 5.5: 2 x (2,000 + 4 x 2 x 8 x 5.5) + 2 x 160 = 2 x 2,352 + 320 = 5,024.
    assert generate_flops(SHAPE, [4], [2]) == 9024 + 5024
    assert generate_flops(SHAPE, [4, 4], [2, 0]) == 9024 + 5024 + 9024  # a row that stopped at once: prefill only
    # the whole row, 6 tokens attending to 6, 2 logit rows: 6 x (2,000 + 384) + 320 = 14,624
    assert sequence_flops(SHAPE, [4], [2]) == 14624
    # training adds the backward: all 2 layers, 10 LoRA weights: 6 x (2 x 500 x 2 + 8 x 2 x 8 x 6) + 320 + 4 x 10 x 6
    # = 6 x 2,768 + 320 + 240
    assert lora_train_flops(SHAPE, [4], [2], trained_layers=2, lora_params=10) == 14624 + 16608 + 320 + 240


def test_pair_train_flops_by_hand():
    shape = DecoderShape(matmul_params=1_000, layers=2, width=8, vocab=10)
    # 6 tokens attending to 5: forward 6 (2,000 + 4 x 2 x 8 x 5) = 13,920; backward 6 (1,000 + 8 x 1 x 8 x 5)
    # + 240 = 6 x 1,320 + 240 = 8,160
    assert pair_train_flops(shape, [(2, 1, 3)], 1, 10) == pytest.approx(22_080)
    assert pair_train_flops(shape, [(2, 1, 3)] * 2, 1, 10) == pytest.approx(44_160)


def test_lm_train_flops_per_token_by_hand():
    shape = DecoderShape(matmul_params=1_000, layers=2, width=8, vocab=10)
    # forward 2,000 + 4 x 2 x 8 x 2 + 2 x 8 x 10 = 2,288; backward 2 x 500 x 2 + 8 x 2 x 8 x 2 + 160 + 40 = 2,456
    assert lm_train_flops_per_token(shape, 2, 2, 10) == pytest.approx(4_744)
    assert lm_train_flops_per_token(shape, 2, 2, 10, logit_share=0.5) == pytest.approx(4_584)


def test_lm_train_flops_counts_the_body_on_tokens_run_and_the_head_on_tokens_given():
    shape = DecoderShape(matmul_params=1_000, layers=2, width=8, vocab=10)
    # body 4,744 - head 2 x 2 x 8 x 10 = 4,424 per token run; 10 given, 6 run, logits on half:
    # 6 x 4,424 + 10 x 0.5 x 320 = 26,544 + 1,600 = 28,144
    assert lm_train_flops(shape, 10, 6, 2, 2, 10, 0.5) == pytest.approx(28_144)
    # nothing shared: tokens x the per-token count
    assert lm_train_flops(shape, 10, 10, 2, 2, 10, 0.5) == pytest.approx(10 * 4_584)


def test_estimate_line_states_the_time_at_typical_and_full_mfu():
    line = estimate_line("reward", "144 steps", 1.8e14, 2e11)
    assert "180.0 TFLOP" in line and "200 GFLOP/s" in line
    assert f"{900 / TYPICAL_MFU / 60:.0f} min" in line and "15 min at 100%" in line


def test_logit_share_counts_labelled_tokens_where_the_head_is_compact(monkeypatch):
    import torch
    from datasets import Dataset

    from pipeline.models import trainer_utils

    ds = Dataset.from_list([{"input_ids": [1, 2, 3, 4], "assistant_masks": [0, 0, 0, 1]},
                            {"input_ids": [1, 2, 3, 4, 5, 6], "assistant_masks": [0, 0, 0, 1, 1, 1]}])
    assert trainer_utils.logit_share(ds, torch.device("cpu")) == pytest.approx(0.4)  # the docstring's 4 / 10
    assert trainer_utils.logit_share(ds.remove_columns("assistant_masks"), torch.device("cpu")) == 1.0
    monkeypatch.setattr(trainer_utils, "COMPACT_LM_HEAD", False)
    assert trainer_utils.logit_share(ds, torch.device("cpu")) == 1.0
