"""The forgetting check: its math by hand, and on the tiny NF4 model the base's KL to itself, a zero-B
adapter and a random adapter, against losses and KLs computed independently from whole logits."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_lora_b

from pipeline.data.loaders import DataError
from pipeline.evaluation import forgetting

LN2, LN3 = math.log(2.0), math.log(3.0)


def test_token_nll_and_kl_by_hand():
    logits = torch.tensor([[0.0, 0.0], [LN3, 0.0]])
    base = torch.tensor([[5.0, 5.0 + LN3], [LN3, 0.0]])  # a shift of every logit (+5) changes nothing
    nll, kl = forgetting.token_nll_and_kl(logits, base, torch.tensor([0, 1]))
    # row 0: p = (1/2, 1/2), q = (1/4, 3/4); -log p_0 = ln 2 = 0.6931;
    #        KL = 1/2 ln(2) + 1/2 ln(2/3) = 1/2 ln(4/3) = 0.1438
    # row 1: p = q = (3/4, 1/4); -log p_1 = ln 4 = 1.3863; KL = 0 exactly
    assert nll.tolist() == pytest.approx([LN2, 2 * LN2], abs=1e-6)
    assert kl[0].item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-6)
    assert kl[1].item() == 0.0
    assert nll.dtype == kl.dtype == torch.float32
    # bf16 logits are upcast: ln 3 = 1.0986 rounds to 1 + 13/128 = 1.1016 in bf16, e^1.1016 = 3.0089,
    # p_1 = 1 / 4.0089 = 0.24944, -log p_1 = 1.3885
    nll16, kl16 = forgetting.token_nll_and_kl(logits.bfloat16(), logits.bfloat16(), torch.tensor([0, 1]))
    assert nll16[1].item() == pytest.approx(1.3885, abs=1e-4) and kl16.tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="expected logits"):
        forgetting.token_nll_and_kl(logits, base[:1], torch.tensor([0, 1]))


def test_summarize_weights_every_token_equally():
    s = forgetting.summarize([2.0, 4.0], [0.1, 0.3], [1, 3])
    # (2 + 4) / (1 + 3) = 1.5 nats per token, not the passage average (2/1 + 4/3) / 2 = 1.667
    assert s["nll"] == 1.5 and s["ppl"] == pytest.approx(4.4816890703, abs=1e-9)  # e^1.5
    assert s["kl"] == pytest.approx(0.1)  # (0.1 + 0.3) / 4
    assert (s["tokens"], s["passages"]) == (4, 2)
    with pytest.raises(ValueError, match="no scored tokens"):
        forgetting.summarize([], [], [])


def test_read_passages_names_the_row_at_fault(tmp_path):
    f = tmp_path / "general.jsonl"
    f.write_text(json.dumps({"text": "One passage."}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(DataError, match=r"general.jsonl row 2: needs a non-empty 'text' field .*eval.forgetting"):
        forgetting.read_passages(str(f))
    with pytest.raises(DataError, match="file not found"):
        forgetting.read_passages(str(tmp_path / "missing.jsonl"))
    texts = forgetting.read_passages("data/general_text.jsonl")
    assert len(texts) == 48 and all(isinstance(t, str) and len(t) > 100 for t in texts)


# ---------------------------------------------------------------------------------------------
# On the tiny NF4 model


@pytest.fixture(scope="module")
def tiny_nf4():
    """The tiny NF4 base with a zero-B adapter ("zero", as peft initialises it) and a random one."""
    from pipeline.config import LoraConfigSection, ModelConfig
    from pipeline.models import loading, stacking

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    base, tok, _ = loading.load_base(ModelConfig(name="embedded:tiny-random-llama", compute_dtype="float32"))
    lora = loading.lora_config(LoraConfigSection(r=4, alpha=8, dropout=0.0))
    peft = stacking.stack_adapters(base, {}, new_adapter=("zero", lora))
    peft.add_adapter("random", loading.lora_config(LoraConfigSection(r=4, alpha=8, dropout=0.0)))
    randomize_lora_b(peft, 0.5, torch.Generator().manual_seed(1))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if ".zero." in name and "lora_B" in name:
                p.zero_()
    peft.eval()
    # 5 passages in batches of 2 (padding), cut to 40 tokens; chunks of 7 positions cross passages
    texts = forgetting.read_passages("data/general_text.jsonl")[:5]
    text = forgetting.encode_passages(tok, texts, "general", max_tokens=40, batch_size=2)
    probe = forgetting.ForgettingProbe(peft, text, chunk=7)
    yield peft, tok, texts, text, probe
    torch.set_num_threads(threads)


def _reference(peft, tok, texts, adapters, max_tokens=40):
    """Per passage, one at a time without padding, from whole logits: (sum of -log p(next), sum of KL)."""
    from pipeline.models import stacking

    out = []
    for text in texts:
        ids = torch.tensor([tok(text).input_ids[:max_tokens]])
        with torch.no_grad():
            with stacking.active_adapters(peft, adapters):
                logits = peft(input_ids=ids).logits[0, :-1]
            with stacking.active_adapters(peft, None):
                base = peft(input_ids=ids).logits[0, :-1]
        logp, logq = F.log_softmax(logits, -1), F.log_softmax(base, -1)
        nll = -logp.gather(-1, ids[0, 1:, None]).sum().item()
        out.append((nll, F.kl_div(logq, logp, reduction="sum", log_target=True).item()))
    return out


def test_base_kl_to_itself_is_exactly_zero_and_losses_match_whole_logits(tiny_nf4):
    peft, tok, texts, text, probe = tiny_nf4
    base = probe.measure(adapters=None)
    assert base["kl_sums"] == [0.0] * 5 and base["kl"] == 0.0
    assert text.truncated == 5 and text.tokens == 5 * 39 and base["token_counts"] == [39] * 5  # in file order
    ref = _reference(peft, tok, texts, None)
    assert base["nll_sums"] == pytest.approx([r[0] for r in ref], rel=1e-5)
    assert base["nll"] == pytest.approx(sum(r[0] for r in ref) / (5 * 39), rel=1e-5)
    assert base["ppl"] == pytest.approx(math.exp(base["nll"]))


def test_zero_b_adapter_is_the_base_and_a_random_adapter_moves_away(tiny_nf4):
    peft, tok, texts, _, probe = tiny_nf4
    base = probe.measure(adapters=None)
    zero = probe.measure(adapters=["zero"])
    assert zero["kl_sums"] == [0.0] * 5 and zero["nll_sums"] == base["nll_sums"]  # exactly: B = 0 adds 0
    moved = probe.measure(adapters=["random"])
    assert all(k > 1e-3 for k in moved["kl_sums"]) and moved["nll"] != base["nll"]
    ref = _reference(peft, tok, texts, ["random"])
    assert moved["nll_sums"] == pytest.approx([r[0] for r in ref], rel=1e-5)
    assert moved["kl_sums"] == pytest.approx([r[1] for r in ref], rel=1e-4)
    # Both adapters at once sum their deltas: the random one's B alone is nonzero, so the same model
    both = probe.measure(adapters=["zero", "random"])
    assert both["kl_sums"] == pytest.approx(moved["kl_sums"], rel=1e-6)
    table = forgetting.table([("base", base), ("random", moved)], probe.text)
    assert "Forgetting check on general (5 passages, 195 scored tokens, 5 cut" in table
    assert f"{moved['nll'] - base['nll']:+8.4f}" in table.splitlines()[-1]


def test_kept_base_logprobs_and_the_base_own_hidden_states_change_nothing(tiny_nf4, monkeypatch):
    """The base's log-probabilities kept across models (under BASE_LOGPROBS_MAX_BYTES) and the base's own
    measurement from its kept hidden states give what recomputing them gives, exactly; the base then
    runs no forward."""
    from pipeline.models import forwards

    peft, _, _, text, probe = tiny_nf4
    assert probe.base_logprobs is not None and len(probe.base_logprobs) == len(text.batches)
    calls = []
    hook = forwards.backbone(peft).register_forward_hook(lambda *a: calls.append(1))
    try:
        kept = [probe.measure(adapters=a) for a in (None, ["random"])]
        assert len(calls) == len(text.batches)  # the random adapter's batches; none for the base
        monkeypatch.setattr(forgetting, "BASE_LOGPROBS_MAX_BYTES", 0)
        fresh_probe = forgetting.ForgettingProbe(peft, text, chunk=7)
        assert fresh_probe.base_logprobs is None
        # the zero adapter (B = 0) is the base, computed by a forward
        fresh = [fresh_probe.measure(adapters=a) for a in (["zero"], ["random"])]
    finally:
        hook.remove()
    for k, f in zip(kept, fresh):
        assert k["nll_sums"] == f["nll_sums"] and k["kl_sums"] == f["kl_sums"]


def test_policies_on_top_layers_replay_the_sft_trunk_and_measure_as_the_full_forward(tiny_nf4):
    """Models whose adapters differ from ``trunk_of``'s only in the top layers (PPO checkpoints over the SFT
    adapter) get the same loss and KL as a full forward, to float round-off, with the layers below run
    once for all of them."""
    from pipeline.config import LoraConfigSection
    from pipeline.models import loading

    peft, _, _, text, probe = tiny_nf4
    layers = len(loading.decoder_layers(peft)[1])
    gen = torch.Generator().manual_seed(5)
    for name in ("top1", "top2"):
        peft.add_adapter(name, loading.lora_config(LoraConfigSection(
            r=4, alpha=8, dropout=0.0, top_layers=1, target_modules=["q_proj", "v_proj", "down_proj"]), model=peft))
        with torch.no_grad():
            for n, p in peft.named_parameters():
                if f".{name}." in n and "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    calls = []
    # the first layer's attention runs only where the layer computes (a replayed layer returns its record)
    hook = loading.decoder_layers(peft)[1][0].self_attn.register_forward_hook(lambda *a: calls.append(1))
    try:
        full = [probe.measure(adapters=["random", t]) for t in ("top1", "top2")]
        assert len(calls) == 2 * len(text.batches)
        calls.clear()
        shared = [probe.measure(adapters=["random", t], trunk_of=["random"]) for t in ("top1", "top2")]
        # the first layer ran once per batch for both models (the trunk, below the top layer), and not again
        assert len(calls) == len(text.batches) and layers > 1
        calls.clear()
        sft = probe.measure(adapters=["random"], trunk_of=["random"])  # the trunk's own adapters: a full forward
        assert len(calls) == len(text.batches)
    finally:
        hook.remove()
        for name in ("top1", "top2"):
            peft.delete_adapter(name)
    for f, s in zip(full, shared):
        assert s["nll_sums"] == pytest.approx(f["nll_sums"], rel=1e-5)
        assert s["kl_sums"] == pytest.approx(f["kl_sums"], rel=1e-4, abs=1e-6)
    assert full[0]["kl"] != full[1]["kl"] != sft["kl"]  # the top layers' adapters count


def test_a_full_model_is_measured_against_its_snapshot(tiny_nf4):
    """A plain model whose head trains (a full fine-tune): the probe keeps the base's head."""
    from pipeline.config import ModelConfig
    from pipeline.models import loading

    _, _, _, text, _ = tiny_nf4
    plain, _, _ = loading.load_dequantized_base(ModelConfig(name="embedded:tiny-random-llama"))
    probe = forgetting.ForgettingProbe(plain, text, snapshot=True)
    before = probe.measure(plain)
    assert before["kl"] == 0.0
    with torch.no_grad():
        head = plain.get_output_embeddings().weight  # tied: the input embeddings move too
        head.add_(torch.randn(head.shape, generator=torch.Generator().manual_seed(2)) * 0.05)
    after = probe.measure(plain)
    assert after["kl"] > 0 and after["nll"] != before["nll"]
    with pytest.raises(ValueError, match="without adapters"):
        probe.measure(plain, adapters=["sft"])


def test_exact_zeros_hold_in_bf16_compute(tiny_nf4):
    """Under bf16 autocast too: the base against itself and a zero-B adapter give a KL of exactly 0."""
    from pipeline.config import LoraConfigSection, ModelConfig
    from pipeline.models import loading, stacking

    _, tok, texts, _, _ = tiny_nf4
    base, _, _ = loading.load_base(ModelConfig(name="embedded:tiny-random-llama", compute_dtype="bfloat16"))
    peft = stacking.stack_adapters(base, {}, new_adapter=("zero", loading.lora_config(LoraConfigSection(r=4))))
    peft.eval()
    probe = forgetting.ForgettingProbe(peft, forgetting.encode_passages(tok, texts, "general", 40, 2), chunk=7)
    own, zero = probe.measure(adapters=None), probe.measure(adapters=["zero"])
    assert own["kl_sums"] == zero["kl_sums"] == [0.0] * 5 and own["nll_sums"] == zero["nll_sums"]
    assert math.isfinite(own["nll"]) and own["nll"] > 0


# ---------------------------------------------------------------------------------------------
# The demo (benchmarks/forgetting_demo.py): LoRA SFT next to a full fine-tune, on the tiny config


def _demo_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "forgetting_demo.py"
    spec = importlib.util.spec_from_file_location("forgetting_demo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_forgetting_demo_puts_a_full_fine_tune_next_to_the_lora_adapter(tmp_path, tiny_nf4):
    from click.testing import CliRunner

    from pipeline.cli import main

    rows = [{"messages": [{"role": "user", "content": f"Tell me about topic {i}."},
                          {"role": "assistant", "content": f"Topic {i} is lovely and great to learn about!"}]}
            for i in range(6)]
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = [f"data.sft_train={sft}", f"data.sft_eval={sft}"]
    run = tmp_path / "run"
    demo = _demo_module()
    with pytest.raises(Exception, match=r"no SFT adapter at .*run/sft.*make sft"):
        demo.main(["--config", "configs/tiny.yaml", "--run-dir", str(run), "--steps", "2", *data])
    r = CliRunner().invoke(main, ["sft", "--config", "configs/tiny.yaml", "--run-dir", str(run), *data,
                                  "sft.gold_eval_prompts=0", "sft.max_steps=2"])
    assert r.exit_code == 0, (r.output, r.exception)
    demo.main(["--config", "configs/tiny.yaml", "--run-dir", str(run), "--steps", "2", "--learning-rate", "1e-3",
               *data, "eval.forgetting_max_tokens=24"])
    out = run / "forgetting-demo"
    results = json.loads((out / "results.json").read_text())
    base, lora, start, full = (results[k] for k in ("base", "lora_sft", "full_ft_start", "full_ft"))
    assert base["kl"] == 0.0 and start["kl"] == 0.0  # each start against itself, computed
    assert lora["kl"] > 0.0 and full["kl"] > 0.0
    # the full fine-tune starts from the NF4 base dequantized to float32: the same model, another kernel
    assert start["nll"] == pytest.approx(base["nll"], rel=1e-4)
    assert base["tokens"] == full["tokens"] == 48 * 23  # 48 passages cut to 24 tokens, 23 scored each
    # the trained adapter learned the task: lower loss on the SFT rows than the base
    assert lora["task_eval_loss"] < base["task_eval_loss"] and math.isfinite(full["task_eval_loss"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "forgetting-demo" and manifest["metrics"]["full_ft"]["steps"] == 2
    assert manifest["metrics"]["full_ft"]["trainable_params"] > 10 * manifest["metrics"]["lora"]["trainable_params"]
    assert manifest["config"]["sft"]["learning_rate"] == 1e-3 and manifest["config"]["sft"]["max_steps"] == 2
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "full_ft/loss" in r] == [1, 2]  # tiny.yaml logs every step
    assert [r["full_ft/eval_loss"] for r in logged if "full_ft/eval_loss" in r] == [full["task_eval_loss"]]
    summary = (out / "summary.txt").read_text()
    assert "full FT, 2 steps" in summary and "LoRA SFT adapter" in summary and "Task (data.sft_eval" in summary
    assert not (out / "trainer").exists()  # no fine-tuned weights or trainer checkpoints kept
    with pytest.raises(Exception, match="already holds a complete output"):
        demo.main(["--config", "configs/tiny.yaml", "--run-dir", str(run), "--steps", "1", *data])
