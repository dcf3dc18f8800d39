"""Checks on the embedded SmolLM2-135M-Instruct in NF4 (slow: `make test-slow`)."""
import json
from pathlib import Path

import pytest
import torch
from helpers import randomize_lora_b

from pipeline.artifacts import hashing
from pipeline.artifacts.outputs import write_manifest
from pipeline.config import LoraConfigSection, ModelConfig, PipelineConfig, load_config
from pipeline.models import loading, stacking
from pipeline.stages import fuse

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
EMBEDDED = "embedded:smollm2-135m-instruct"


def test_embedded_guard_keeps_gradients_after_a_generate():
    from peft import get_peft_model

    from pipeline.models.forwards import left_pad
    from pipeline.rl.rollout import generate

    model, tok, _ = loading.load_base(ModelConfig(name=EMBEDDED))
    pm = get_peft_model(model, loading.lora_config(LoraConfigSection(r=8, alpha=16, dropout=0.0)))
    ids = tok.apply_chat_template([{"role": "user", "content": "Say hi."}], add_generation_prompt=True,
                                  return_dict=True)["input_ids"]
    q, qm = left_pad([list(ids)], tok.pad_token_id)
    pm.eval()
    with torch.no_grad():
        eval_logits = pm(input_ids=q).logits
    generate(pm, tok, q, qm, max_new_tokens=4, temperature=0.7)
    pm.train()
    out = pm(input_ids=q)
    assert torch.equal(out.logits.detach(), eval_logits)
    out.logits.sum().backward()
    grads = [p.grad for n, p in pm.named_parameters() if "layers.0." in n and "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_embedded_cat_fusion_matches_stacked_adapters(tmp_path):
    from peft import PeftModel, get_peft_model

    # float32 compute: the claim is exact arithmetic; with `auto` on a bf16 CPU the stacked and the fused
    # adapters round differently (0.625 logits apart on the embedded model, measured).
    model, tok, info = loading.load_base(ModelConfig(name=EMBEDDED, compute_dtype="float32"))
    sft = loading.lora_config(LoraConfigSection(r=16, alpha=32, dropout=0.05))
    ppo = loading.lora_config(LoraConfigSection(r=8, alpha=16, dropout=0.0))
    pm = get_peft_model(model, sft, adapter_name="sft")
    pm.add_adapter("ppo", ppo)
    randomize_lora_b(pm, 0.01, torch.Generator().manual_seed(0))
    cfg = PipelineConfig(model=ModelConfig(name=EMBEDDED, compute_dtype="float32"))
    cfg.fuse.merged = False
    stacking.save_adapter(pm, "sft", tmp_path / "sft")
    write_manifest(tmp_path / "sft", "sft", cfg, info, metrics={})
    stacking.save_adapter(pm, "ppo", tmp_path / "ppo")
    write_manifest(tmp_path / "ppo", "ppo", cfg, info, metrics={}, extra={"stacked_on": ["sft"]},
                   adapters={"sft": {"path": str(tmp_path / "sft"),
                                     "sha256": hashing.sha256_file(tmp_path / "sft" / "adapter_model.safetensors")}})
    ids = tok("What a lovely morning for a walk in the park!", return_tensors="pt").input_ids
    pm.eval()
    with torch.no_grad(), stacking.active_adapters(pm, ["sft", "ppo"]):
        stacked = pm(input_ids=ids).logits
    out = fuse.run_fuse(cfg, tmp_path)
    pm.unload()  # back to the plain base, then the fused adapter through plain peft
    fused = PeftModel.from_pretrained(pm.get_base_model(), str(out / "adapter"))
    fused.eval()
    with torch.no_grad():
        diff = (fused(input_ids=ids).logits - stacked).abs().max().item()
    assert diff < 1e-4, diff


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_embedded_first_ppo_step(tmp_path, dtype):
    from pipeline.stages.ppo import run_ppo

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("Say something kind.", "Describe rain.")))
    cfg = load_config(REPO / "configs" / "default.yaml", [
        f"data.prompts_train={prompts}", "ppo.sft_adapter=", "ppo.reference=base", "ppo.steps=1",
        "ppo.batch_size=2", "ppo.max_new_tokens=8", "ppo.rewards=[{name: sentiment}]", "ppo.save_every=0",
        f"model.compute_dtype={dtype}"])
    run_ppo(cfg, tmp_path / "run")
    row = json.loads((tmp_path / "run" / "ppo" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["ppo/kl"] == 0.0
    assert row["ppo/first_ratio"] == 1.0 and row["ppo/first_clipfrac"] == 0.0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_embedded_merged_sampling_weights_match_the_adapter_path(dtype):
    """The sampler's weights (dequantized base + merged LoRA) vs the training path (4-bit + LoRA).

    fp32: equal to rounding. bf16: the two round differently; measured KL(merged || adapters)
    0.003 nats per token, a third of the gap between bf16 and fp32 compute of the same model (0.011)."""
    from peft import get_peft_model

    from pipeline.config import LoraConfigSection, PipelineConfig
    from pipeline.models import loading, stacking

    cfg = PipelineConfig()
    cfg.model.compute_dtype = dtype
    model, tok, _ = loading.load_base(cfg.model)
    torch.manual_seed(0)
    pm = get_peft_model(model, loading.lora_config(LoraConfigSection(r=8, alpha=16, dropout=0.0)))
    randomize_lora_b(pm, 0.02)
    pm.eval()
    ids = tok("The weather today is lovely and I feel", return_tensors="pt").input_ids
    with torch.no_grad(), loading.compute_context(pm):
        adapters = torch.log_softmax(pm(input_ids=ids).logits.float(), -1)
        with stacking.merged_linear_weights(pm):
            merged = torch.log_softmax(pm(input_ids=ids).logits.float(), -1)
        with stacking.active_adapters(pm, None):
            base = torch.log_softmax(pm(input_ids=ids).logits.float(), -1)
    kl = (merged.exp() * (merged - adapters)).sum(-1).mean().item()
    adapter_effect = (adapters.exp() * (adapters - base)).sum(-1).mean().item()
    assert adapter_effect > 1e-3
    if dtype == "float32":
        assert (merged - adapters).abs().max() < 1e-4
    else:
        assert kl < 0.01, kl
