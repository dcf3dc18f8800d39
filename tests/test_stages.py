"""SFT and reward stages through the CLI on the tiny config, and the whole pipeline end to end."""
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.models import loading

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "tiny.yaml")


def _invoke(*args):
    r = CliRunner().invoke(main, list(args))
    assert r.exit_code == 0, r.output
    return r


@pytest.fixture(scope="module")
def threads():
    # The tiny model is faster on one thread, and bitsandbytes' OpenMP threads stall when a core is busy.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def sft_run(request, tmp_path_factory, threads):
    """Run `rlhf sft` once per compute precision, keeping the trained in-memory model and a snapshot of
    the base before training."""
    from trl import SFTTrainer

    run = tmp_path_factory.mktemp("run")
    seen = {}
    original = SFTTrainer.train

    def train(self, *a, **k):
        seen["before"] = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        out = original(self, *a, **k)
        seen["model"] = self.model
        return out

    SFTTrainer.train = train
    try:
        _invoke("sft", "--config", CONFIG, "--run-dir", str(run), f"model.compute_dtype={request.param}")
    finally:
        SFTTrainer.train = original
    seen["precision"] = request.param
    return run, seen


def test_sft_trains_the_adapter_and_leaves_the_base_byte_identical(sft_run):
    _, seen = sft_run
    after = dict(seen["model"].named_parameters())
    lora_b = [n for n in after if "lora_B" in n]
    assert lora_b and all(after[n].abs().sum() > 0 for n in lora_b)  # B starts at 0
    unchanged = [n for n in after if "lora_A" in n and torch.equal(after[n], seen["before"][n])]
    assert not unchanged, unchanged
    base = [n for n in after if "lora_" not in n]
    assert any(after[n].dtype == torch.uint8 for n in base)  # the NF4 weights are among them
    for n in base:
        assert torch.equal(after[n].detach(), seen["before"][n]), n


def test_sft_adapter_reloads_with_plain_peft_and_reproduces_logits(sft_run):
    from peft import PeftModel

    run, seen = sft_run
    trained = seen["model"]
    trained.eval()
    cfg = load_config(CONFIG, [f"model.compute_dtype={seen['precision']}"])
    base, tok, _ = loading.load_base(cfg.model)
    reloaded = PeftModel.from_pretrained(base, str(run / "sft"))
    reloaded.eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "Tell me a fun fact."}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        a = trained(input_ids=ids).logits.float()
        with loading.compute_context(reloaded):  # the mixed precision the trainer ran in (a no-op in float32)
            b = reloaded(input_ids=ids).logits.float()
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_sft_artifact_is_complete(sft_run):
    run, _ = sft_run
    out = run / "sft"
    for name in ("adapter_model.safetensors", "adapter_config.json", "config.yaml", "metrics.jsonl", "manifest.json"):
        assert (out / name).is_file(), name
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "sft"
    assert manifest["base"]["name"] == "embedded:tiny-random-llama"
    assert manifest["base"]["quantization"]["quant_type"] == "nf4"
    assert len(manifest["base"]["weights_sha256"]) == 64 and len(manifest["data"]["train"]["sha256"]) == 64
    m = manifest["metrics"]
    assert m["eval_loss_after"] < m["eval_loss_before"]
    assert m["trainable_params"] > 0 and m["total_params"] > m["trainable_params"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("sft/loss" in r for r in rows)
    assert not list(run.glob(".sft.tmp-*"))
    # gold before/after on the eval prompts, with the samples kept for the reward stage's correlation
    samples = [json.loads(line) for line in (out / "gold_samples.jsonl").read_text().split("\n") if line.strip()]
    cfg = load_config(CONFIG)
    n = min(cfg.sft.gold_eval_prompts, cfg.data.max_rows) * cfg.sft.gold_samples_per_prompt
    assert [s["model"] for s in samples] == ["base"] * n + ["sft"] * n == ["base"] * m["gold_samples"] + ["sft"] * n
    sft_gold = [s["gold"] for s in samples if s["model"] == "sft"]
    assert m["gold_after"] == pytest.approx(sum(sft_gold) / n) and m["gold_after_se"] >= 0


def test_existing_output_is_not_overwritten(sft_run):
    run, _ = sft_run
    r = CliRunner().invoke(main, ["sft", "--config", CONFIG, "--run-dir", str(run)])
    assert r.exit_code != 0 and "--overwrite" in r.output


def test_bad_sft_rows_name_file_and_row(tmp_path, threads):
    bad = tmp_path / "bad.jsonl"
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    bad.write_text(json.dumps(good) + "\n" + json.dumps({"messages": [{"role": "bot", "content": "x"}]}) + "\n")
    r = CliRunner().invoke(main, ["sft", "--config", CONFIG, "--run-dir", str(tmp_path / "run"),
                                  f"data.sft_train={bad}"])
    assert r.exit_code != 0
    assert "bad.jsonl row 2" in r.output and "'bot'" in r.output
    assert not (tmp_path / "run" / "sft").exists()


@pytest.fixture(scope="module")
def reward_run(sft_run):
    run, _ = sft_run
    _invoke("reward", "--config", CONFIG, "--run-dir", str(run))
    return run


def test_reward_training_reaches_every_lora_weight(reward_run, sft_run):
    """Every LoRA A and B of the reward adapter moved from its initial value (B starts at 0; A's init is
    rebuilt from reward.seed): gradients reached every layer, in both precisions."""
    from peft import get_peft_model
    from safetensors.torch import load_file

    cfg = load_config(CONFIG, [f"model.compute_dtype={sft_run[1]['precision']}"])
    model, _, _ = loading.load_base(cfg.model, kind="seqcls", num_labels=1)
    torch.manual_seed(cfg.reward.seed)
    init = get_peft_model(model, loading.lora_config(cfg.reward.lora, task_type="SEQ_CLS", model=model))
    start = {n.replace(".default", ""): p.detach().float() for n, p in init.named_parameters() if "lora_" in n}
    saved = load_file(str(reward_run / "reward" / "adapter_model.safetensors"))
    lora = {k: v for k, v in saved.items() if "lora_" in k}
    assert lora and set(lora) == set(start)
    unchanged = [k for k, v in lora.items() if torch.equal(v.float(), start[k])]
    assert not unchanged, unchanged


def test_reward_model_reloads_with_the_same_scores(reward_run):
    """The learned reward served on its own base and attached to a policy's base scores identically."""
    from peft import get_peft_model

    from pipeline.models.reward_model import load_reward_scorer

    manifest = json.loads((reward_run / "reward" / "manifest.json").read_text())
    assert {"eval_accuracy", "eval_accuracy_se", "eval_accuracy_n", "eval_margin", "eval_n_pairs",
            "eval_accuracy_vs_gold", "eval_accuracy_vs_gold_se", "eval_accuracy_vs_gold_n",
            "spearman_vs_gold_sft_samples", "sft_samples_scored"} <= set(manifest["metrics"])
    assert -1.0 <= manifest["metrics"]["spearman_vs_gold_sft_samples"] <= 1.0
    prompts = ["How are you?", "Tell me about cats."]
    responses = ["Wonderful, thank you!", "They are awful."]
    alone = load_reward_scorer(reward_run / "reward")(prompts, responses)
    cfg = load_config(CONFIG)
    base, tok, info = loading.load_base(cfg.model)
    policy = get_peft_model(base, loading.lora_config(cfg.ppo.lora), adapter_name="policy")
    shared = load_reward_scorer(reward_run, host=(policy, tok, info))
    assert shared.model is policy  # attached, not loaded again
    assert torch.allclose(torch.tensor(alone), torch.tensor(shared(prompts, responses)), atol=1e-5)
    # the pair metrics in the manifest come from the same scorer
    assert 0.0 <= manifest["metrics"]["eval_accuracy"] <= 1.0


def test_pipeline_end_to_end_through_the_cli(reward_run):
    run = reward_run
    _invoke("ppo", "--config", CONFIG, "--run-dir", str(run))
    _invoke("fuse", "--config", CONFIG, "--run-dir", str(run), "fuse.method=learned", "fuse.prompts=4",
            "fuse.samples_per_prompt=2", "fuse.sft_rows=4", "fuse.epochs=1")
    _invoke("eval", "--config", CONFIG, "--run-dir", str(run))
    for stage in ("sft", "reward", "ppo", "fused", "eval"):
        assert (run / stage / "manifest.json").is_file(), stage
    assert (run / "fused" / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "fused" / "gate.safetensors").is_file()
    assert (run / "fused" / "merged" / "config.json").is_file()
    # the learned fusion and its mean-gate approximation are points of their own on the curves
    fused_rows = [r for r in (run / "eval" / "curves.csv").read_text().splitlines() if r.startswith("fused,")]
    assert [r.split(",")[1] for r in fused_rows] == ["fused:learned", "fused:mean-gate"]
    assert (run / "eval" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (run / "eval" / "curves.csv").read_text().splitlines()
    assert rows[0].startswith("kind,") and len(rows) > 4
    assert "Gao et al. 2022 fits" in (run / "eval" / "summary.txt").read_text()
    # where the eval's time went: every phase measured, and together they are its wall time
    seconds = json.loads((run / "eval" / "manifest.json").read_text())["metrics"]["seconds"]
    assert seconds["generate"] > 0 and seconds["kl"] > 0 and seconds["score"] > 0 and seconds["total"] > 0
    assert abs(sum(v for k, v in seconds.items() if k != "total") - seconds["total"]) < 0.5
    ppo_rows = [json.loads(line) for line in (run / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in ppo_rows] == [1, 2, 3]
    assert ppo_rows[0]["ppo/kl"] == 0.0 and ppo_rows[0]["ppo/first_ratio"] == 1.0
    for key in ("ppo/kl_coef", "ppo/score/reward_model", "ppo/score/sentiment", "ppo/monitor/gold", "ppo/rlhf_reward",
                "ppo/entropy", "ppo/approx_kl", "ppo/clipfrac", "ppo/policy_loss", "ppo/value_loss",
                "ppo/response_length", "ppo/eos_fraction", "time/generate", "time/score", "time/train"):
        assert key in ppo_rows[-1], key
    # model FLOPs per phase (pipeline/models/throughput.py) against this machine's measured matmul peak
    for phase in ("generate", "train"):
        assert ppo_rows[-1][f"perf/flops_{phase}"] > 0 and 0 < ppo_rows[-1][f"perf/mfu_{phase}"] < 1
    ppo_manifest = json.loads((run / "ppo" / "manifest.json").read_text())["metrics"]
    assert ppo_manifest["peak_flops_per_s"] > 0 and 0 < ppo_manifest["mean_mfu_train"] < 1
    # SFT and the reward model report theirs too: per log row and for the whole training loop
    for stage in ("sft", "reward"):
        rows = [json.loads(line) for line in (run / stage / "metrics.jsonl").read_text().splitlines()]
        logged = [r for r in rows if "perf/mfu" in r]
        assert logged and all(0 < r["perf/mfu"] < 1 and r["perf/tokens_per_s"] > 0 for r in logged), stage
        manifest = json.loads((run / stage / "manifest.json").read_text())["metrics"]
        assert manifest["peak_flops_per_s"] > 0 and 0 < manifest["train_mfu"] < 1, stage


def test_compact_lm_head_gives_the_full_heads_loss_and_gradients_on_fewer_rows(tiny_model_cfg, monkeypatch):
    """SFT's loss through trl's fused LM head, with (pipeline.models.trainer_utils.compact_lm_head) and
    without the head restricted to labelled positions on CPU: the same loss, LoRA gradients and logged
    entropy and accuracy to float round-off, from 2 x 11 = 22 projected rows down to the 2 x 5 = 10 that
    carry a label; and the same again with those rows' head in vocabulary blocks (BLOCKED_LM_HEAD)."""
    import trl.trainer.utils as trl_utils
    from helpers import randomize_lora_b
    from peft import get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    from pipeline.config import LoraConfigSection
    from pipeline.models import trainer_utils
    from pipeline.models.trainer_utils import compact_lm_head
    from pipeline.rl import ppo_math

    model, _, _ = loading.load_base(tiny_model_cfg)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    pm = get_peft_model(model, loading.lora_config(LoraConfigSection(r=4, alpha=8, dropout=0.0)))
    randomize_lora_b(pm, 0.05, torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 200, (2, 12), generator=gen)
    labels = ids.clone()
    labels[:, :7] = -100  # the prompt: positions 1..6 predict no label; 7..11 (5 per row) do
    with torch.no_grad():  # two labels per row the model's top-1, so that the accuracy is not all False
        labels[:, 8:10] = pm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, 7:9].argmax(-1)
    rows, blocked_rows = [], []
    original, original_stats = trl_utils._ChunkedLogProbFunction.apply, ppo_math.head_token_stats

    def counting(hidden, *args):
        rows.append(hidden.shape[0])
        return original(hidden, *args)

    def counting_stats(hidden, *args):
        blocked_rows.append(hidden.shape[1])
        return original_stats(hidden, *args)

    def run():
        pm.zero_grad(set_to_none=True)
        out = pm(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, fused_lm_head=True)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}
        return out.loss.detach(), grads, out.entropy.detach(), out.is_top1

    monkeypatch.setattr(ppo_math, "head_token_stats", counting_stats)
    trl_utils._ChunkedLogProbFunction.apply = counting
    try:
        full = run()
        monkeypatch.setattr(trainer_utils, "BLOCKED_LM_HEAD", False)
        with compact_lm_head():
            compact = run()
        monkeypatch.setattr(trainer_utils, "BLOCKED_LM_HEAD", True)
        with compact_lm_head():
            blocked = run()
    finally:
        trl_utils._ChunkedLogProbFunction.apply = original
    assert rows == [22, 10] and blocked_rows == [10]
    assert trl_utils._use_triton(torch.device("cpu")) is False  # the patches are undone
    assert trl_utils._ChunkedLogProbFunction.apply is original
    assert full[0] > 0 and full[1] and full[3].any()
    for loss, grads, entropy, top1 in (compact, blocked):
        assert torch.allclose(loss, full[0], atol=1e-6)
        assert grads.keys() == full[1].keys()
        for name in grads:
            assert torch.allclose(grads[name], full[1][name], atol=1e-6, rtol=1e-5), name
        assert torch.allclose(entropy, full[2], atol=1e-5) and torch.equal(top1, full[3])


def test_sft_runs_without_eval_rows(tmp_path, threads):
    """`data.sft_eval=` (no eval file) with no gold check: the gold prompts' fitting got no load report
    and crashed (the SFT throughput benchmark runs so)."""
    _invoke("sft", "--config", CONFIG, "--run-dir", str(tmp_path / "run"), "data.sft_eval=", "sft.gold_eval_prompts=0",
            "model.compute_dtype=float32")
    metrics = json.loads((tmp_path / "run" / "sft" / "manifest.json").read_text())["metrics"]
    assert "eval_loss_after" not in metrics and metrics["train_tokens"] > 0
