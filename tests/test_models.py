"""Model loading: the embedded cache, NF4 on CPU, the bitsandbytes guard, adapters on one base."""
import json
import shutil

import pytest
import torch

from pipeline import models
from pipeline.config import LoraConfigSection, ModelConfig


def _lora_layer0_grad(model) -> torch.Tensor | None:
    for name, p in model.named_parameters():
        if "layers.0." in name and "lora_B" in name and p.requires_grad:  # A.grad is 0 while B == 0
            return p.grad
    raise AssertionError("no layer-0 LoRA parameter")


def test_local_folder_loads_through_the_same_loader(tiny_path):
    cfg = ModelConfig(name=tiny_path, load_in_4bit=False)
    model, tok, info = models.load_base(cfg)
    assert info.path == tiny_path
    assert info.weights_sha256 == models.weights_hash(tiny_path)
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "left"
    assert next(model.parameters()).dtype == torch.float32


def test_missing_local_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        models.resolve_model_path(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="known: smollm2-135m-instruct"):
        models.resolve_model_path("embedded:nope")


def test_corrupt_cache_is_rebuilt(tmp_path):
    first = models.resolve_model_path("embedded:tiny-random-llama", cache_dir=str(tmp_path))
    digest = models.weights_hash(first)
    weights = next(p for p in (tmp_path / "tiny-random-llama").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-10] + b"corrupted!")
    again = models.resolve_model_path("embedded:tiny-random-llama", cache_dir=str(tmp_path))
    assert models.weights_hash(again) == digest  # rebuilt, deterministically
    (tmp_path / "tiny-random-llama" / "rlhf_cache.json").unlink()
    assert models.weights_hash(models.resolve_model_path("embedded:tiny-random-llama", str(tmp_path))) == digest
    shutil.rmtree(tmp_path / "tiny-random-llama")
    assert models.weights_hash(models.resolve_model_path("embedded:tiny-random-llama", str(tmp_path))) == digest


def test_nf4_load_is_guarded_and_quantized(tiny_model_cfg):
    import bitsandbytes as bnb

    model, _, info = models.load_base(tiny_model_cfg)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7  # q,k,v,o,gate,up,down per layer
    assert all(m.support_avx512bf16_for_cpu is False for m in layers)
    assert info.quantization == {"load_in_4bit": True, "quant_type": "nf4", "double_quant": True,
                                 "compute_dtype": "float32"}
    models.assert_bnb_guarded(model)


def test_gradients_reach_layer0_lora_after_an_eval_nograd_forward(tiny_model_cfg):
    """DESIGN.md 8: one eval-mode no-grad forward must not freeze training (bf16 repack trap)."""
    from peft import get_peft_model

    model, tok, _ = models.load_base(tiny_model_cfg)
    model = get_peft_model(model, models.lora_config(LoraConfigSection(r=4, alpha=8, dropout=0.0)))
    ids = tok("What a lovely day", return_tensors="pt").input_ids
    model.eval()
    with torch.no_grad():
        eval_logits = model(ids).logits
    model.train()
    out = model(ids)
    # eval == train logits exactly: no bf16 kernel slipped in.
    assert torch.equal(eval_logits, out.logits.detach())
    out.logits.sum().backward()
    grad = _lora_layer0_grad(model)
    assert grad is not None and grad.abs().sum() > 0
    models.assert_bnb_guarded(model)


def test_guard_refuses_a_model_already_repacked(tiny_model_cfg):
    import bitsandbytes as bnb

    model, tok, _ = models.load_base(tiny_model_cfg)
    layer = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    layer.weight.quant_state.packing_format_for_cpu = True
    with pytest.raises(RuntimeError, match="already repacked"):
        models.guard_bnb_cpu(model)


def test_lora_settings_come_from_config(tiny_model_cfg):
    from peft import get_peft_model

    model, _, _ = models.load_base(tiny_model_cfg)
    peft_model = get_peft_model(model, models.lora_config(
        LoraConfigSection(r=2, alpha=4, dropout=0.1, target_modules=["q_proj", "v_proj"])))
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert len(names) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    trainable, total = models.count_parameters(peft_model)
    # q: A 2x64 + B 64x2; v: A 2x64 + B 32x2 -> per layer 256 + 192 = 448; two layers -> 896
    assert trainable == 896
    assert total > trainable


def test_adapter_switch_reference_equals_base_and_sft(tiny_model_cfg):
    """policy = base + sft + ppo; reference 'sft' == base + sft; reference 'base' == base."""
    from peft import get_peft_model

    model, tok, _ = models.load_base(tiny_model_cfg)
    ids = tok("Tell me a fun fact", return_tensors="pt").input_ids
    with torch.no_grad():
        base_logits = model(ids).logits.clone()
    lcfg = models.lora_config(LoraConfigSection(r=4, alpha=8, dropout=0.0))
    pm = get_peft_model(model, lcfg, adapter_name="sft")
    pm.add_adapter("ppo", lcfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
        models.set_active_adapters(pm, ["sft"])
        sft_logits = pm(ids).logits.clone()
        models.set_active_adapters(pm, ["sft", "ppo"])
        policy_logits = pm(ids).logits.clone()
        with models.active_adapters(pm, ["sft"]):
            assert torch.equal(pm(ids).logits, sft_logits)
        with models.active_adapters(pm, None):
            assert torch.equal(pm(ids).logits, base_logits)
        assert torch.equal(pm(ids).logits, policy_logits)  # restored after the context
    assert not torch.allclose(sft_logits, base_logits)
    assert not torch.allclose(policy_logits, sft_logits)


def test_cache_marker_lists_file_hashes(tiny_path):
    from pathlib import Path

    info = json.loads((Path(tiny_path) / "rlhf_cache.json").read_text())
    assert info["model"] == "tiny-random-llama"
    for name, digest in info["files"].items():
        assert models.sha256_file(Path(tiny_path) / name) == digest


def test_unguarded_model_shows_the_trap_the_guard_prevents(tiny_model_cfg):
    """Negative control: with the repack allowed, this CPU loses layer-0 gradients (so the test above
    can fail). On a CPU without AVX512-BF16 bitsandbytes never repacks and gradients survive."""
    import bitsandbytes as bnb
    from bitsandbytes.nn.modules import has_avx512bf16
    from peft import get_peft_model

    model, tok, _ = models.load_base(tiny_model_cfg)
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = True
    model = get_peft_model(model, models.lora_config(LoraConfigSection(r=4, alpha=8, dropout=0.0)))
    ids = tok("What a lovely day", return_tensors="pt").input_ids
    model.eval()
    with torch.no_grad():
        model(ids)
    model.train()
    model(ids).logits.sum().backward()
    grad = _lora_layer0_grad(model)
    lost = grad is None or grad.abs().sum() == 0
    assert lost == has_avx512bf16()
    if has_avx512bf16():
        with pytest.raises(RuntimeError, match="not guarded"):
            models.assert_bnb_guarded(model)
