"""Model loading: the embedded cache, NF4 on CPU, the bitsandbytes guard, adapters on one base."""
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import randomize_lora_b

from pipeline.artifacts import hashing
from pipeline.config import LoraConfigSection, ModelConfig
from pipeline.models import embedded, loading, stacking


def _lora_layer0_grad(model) -> torch.Tensor | None:
    for name, p in model.named_parameters():
        if "layers.0." in name and "lora_B" in name and p.requires_grad:  # A.grad is 0 while B == 0
            return p.grad
    raise AssertionError("no layer-0 LoRA parameter")


def test_auto_compute_dtype_is_bf16_where_the_cpu_has_bf16_matmuls(monkeypatch):
    cpu = torch.device("cpu")
    auto = ModelConfig(name="x")
    monkeypatch.setattr(loading, "cpu_has_fast_bf16", lambda: True)
    assert loading.compute_dtype(auto, cpu) == torch.bfloat16
    assert "AMX/AVX512-BF16" in loading.describe_precision(auto, cpu)
    monkeypatch.setattr(loading, "cpu_has_fast_bf16", lambda: False)
    assert loading.compute_dtype(auto, cpu) == torch.float32
    assert "no AMX/AVX512-BF16" in loading.describe_precision(auto, cpu)
    assert loading.compute_dtype(auto, torch.device("cuda")) == torch.bfloat16
    assert loading.compute_dtype(ModelConfig(name="x", compute_dtype="float32"), torch.device("cuda")) == torch.float32
    # this machine: the answer follows torch's own CPU capability checks
    monkeypatch.undo()
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    want = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    assert loading.cpu_has_fast_bf16() == want
    # oneDNN capped below its bf16 kernels emulates bf16 (1 GFLOP/s here): auto must not pick it
    for cap, fast in (("AVX2", False), ("avx512_core", False), ("AVX512_CORE_BF16", want),
                      ("AVX512_CORE_AMX", want), ("ALL", want)):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        assert loading.cpu_has_fast_bf16() == fast, cap


def test_lora_top_layers_adapts_only_the_top_layers(tiny_model_cfg):
    from peft import get_peft_model

    model, _, _ = loading.load_base(tiny_model_cfg)
    pm = get_peft_model(model, loading.lora_config(LoraConfigSection(r=2, alpha=4, dropout=0.0, top_layers=1),
                                                  model=model))
    names = [n for n, p in pm.named_parameters() if p.requires_grad]
    # the tiny model has 2 layers: only layers.1 gets LoRA (7 linear modules x A, B)
    assert len(names) == 14 and all(".layers.1." in n for n in names)
    with pytest.raises(ValueError, match="top_layers"):
        loading.lora_config(LoraConfigSection(top_layers=1))


def test_local_folder_loads_through_the_same_loader(tiny_path):
    cfg = ModelConfig(name=tiny_path, load_in_4bit=False, compute_dtype="float32")
    model, tok, info = loading.load_base(cfg)
    assert info.path == tiny_path
    assert info.weights_sha256 == hashing.weights_hash(tiny_path)
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "left"
    assert next(model.parameters()).dtype == torch.float32


def test_missing_local_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        embedded.resolve_model_path(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="known: smollm2-135m-instruct"):
        embedded.resolve_model_path("embedded:nope")


def test_corrupt_cache_is_rebuilt(tmp_path):
    first = embedded.resolve_model_path("embedded:tiny-random-llama", cache_dir=str(tmp_path))
    digest = hashing.weights_hash(first)
    weights = next(p for p in (tmp_path / "tiny-random-llama").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-10] + b"corrupted!")
    again = embedded.resolve_model_path("embedded:tiny-random-llama", cache_dir=str(tmp_path))
    assert hashing.weights_hash(again) == digest  # rebuilt, deterministically
    (tmp_path / "tiny-random-llama" / "rlhf_cache.json").unlink()
    assert hashing.weights_hash(embedded.resolve_model_path("embedded:tiny-random-llama", str(tmp_path))) == digest
    shutil.rmtree(tmp_path / "tiny-random-llama")
    assert hashing.weights_hash(embedded.resolve_model_path("embedded:tiny-random-llama", str(tmp_path))) == digest


def test_nf4_load_is_guarded_and_quantized(tiny_model_cfg):
    import bitsandbytes as bnb

    model, _, info = loading.load_base(tiny_model_cfg)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7  # q,k,v,o,gate,up,down per layer
    assert all(m.support_avx512bf16_for_cpu is False for m in layers)
    assert info.quantization == {"load_in_4bit": True, "quant_type": "nf4", "double_quant": True,
                                 "compute_dtype": "float32"}
    loading.assert_bnb_guarded(model)


@pytest.mark.parametrize("dequantize_max_gb", [0.0, 1.0])
def test_gradients_reach_layer0_lora_after_an_eval_nograd_forward(tiny_model_cfg_both, dequantize_max_gb):
    """DESIGN.md 8: one eval-mode no-grad forward must not freeze training (bf16 repack trap), on
    bitsandbytes' per-call path and on the weights dequantized once."""
    from peft import get_peft_model

    model, tok, _ = loading.load_base(dataclasses.replace(tiny_model_cfg_both, dequantize_max_gb=dequantize_max_gb))
    model = get_peft_model(model, loading.lora_config(LoraConfigSection(r=4, alpha=8, dropout=0.0)))
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
    loading.assert_bnb_guarded(model)


def test_weights_dequantized_once_compute_what_bitsandbytes_computes_per_call(tiny_model_cfg_both):
    """model.dequantize_max_gb: the dense copy holds the values bitsandbytes dequantizes on each call, so
    logits and LoRA gradients are bit for bit those of the per-call path, in float32 and bf16."""
    from peft import get_peft_model

    out = {}
    for gb in (0.0, 1.0):
        torch.manual_seed(0)
        model, tok, _ = loading.load_base(dataclasses.replace(tiny_model_cfg_both, dequantize_max_gb=gb))
        dense = [m for m in model.modules() if hasattr(m, "dense_weight")]
        assert len(dense) == (14 if gb else 0)
        model = get_peft_model(model, loading.lora_config(LoraConfigSection(r=4, alpha=8, dropout=0.0)))
        randomize_lora_b(model, 0.05)
        ids = tok("What a lovely day it is", return_tensors="pt").input_ids
        with loading.compute_context(model):
            logits = model(ids).logits
        logits.float().sum().backward()
        out[gb] = (logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert torch.equal(out[0.0][0], out[1.0][0])
    assert out[0.0][1].keys() == out[1.0][1].keys()
    assert all(torch.equal(out[0.0][1][k], out[1.0][1][k]) for k in out[0.0][1])
    # a copy over the budget is not made: 14 layers of 64 x 64 or 64 x 128 floats are far over 1 KB
    model, _, _ = loading.load_base(dataclasses.replace(tiny_model_cfg_both, dequantize_max_gb=1e-6))
    assert not any(hasattr(m, "dense_weight") for m in model.modules())


def test_guard_refuses_a_model_already_repacked(tiny_model_cfg):
    import bitsandbytes as bnb

    model, tok, _ = loading.load_base(tiny_model_cfg)
    layer = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    layer.weight.quant_state.packing_format_for_cpu = True
    with pytest.raises(RuntimeError, match="already repacked"):
        loading.guard_bnb_cpu(model)


def test_lora_settings_come_from_config(tiny_model_cfg):
    from peft import get_peft_model

    model, _, _ = loading.load_base(tiny_model_cfg)
    peft_model = get_peft_model(model, loading.lora_config(
        LoraConfigSection(r=2, alpha=4, dropout=0.1, target_modules=["q_proj", "v_proj"])))
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert len(names) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    trainable, total = loading.count_parameters(peft_model)
    # q: A 2x64 + B 64x2; v: A 2x64 + B 32x2 -> per layer 256 + 192 = 448; two layers -> 896
    assert trainable == 896
    assert total > trainable


def test_adapter_switch_reference_equals_base_and_sft(tiny_model_cfg_both):
    """policy = base + sft + ppo; reference 'sft' == base + sft; reference 'base' == base."""
    from peft import get_peft_model

    model, tok, _ = loading.load_base(tiny_model_cfg_both)
    ids = tok("Tell me a fun fact", return_tensors="pt").input_ids
    with torch.no_grad():
        base_logits = model(ids).logits.clone()
    lcfg = loading.lora_config(LoraConfigSection(r=4, alpha=8, dropout=0.0))
    pm = get_peft_model(model, lcfg, adapter_name="sft")
    pm.add_adapter("ppo", lcfg)
    randomize_lora_b(pm, 0.3)
    with torch.no_grad():
        stacking.set_active_adapters(pm, ["sft"])
        sft_logits = pm(ids).logits.clone()
        stacking.set_active_adapters(pm, ["sft", "ppo"])
        policy_logits = pm(ids).logits.clone()
        with stacking.active_adapters(pm, ["sft"]):
            assert torch.equal(pm(ids).logits, sft_logits)
        with stacking.active_adapters(pm, None):
            assert torch.equal(pm(ids).logits, base_logits)
        assert torch.equal(pm(ids).logits, policy_logits)  # restored after the context
    assert not torch.allclose(sft_logits, base_logits)
    assert not torch.allclose(policy_logits, sft_logits)


def test_cache_marker_lists_file_hashes(tiny_path):
    from pathlib import Path

    info = json.loads((Path(tiny_path) / "rlhf_cache.json").read_text())
    assert info["model"] == "tiny-random-llama"
    for name, digest in info["files"].items():
        assert hashing.sha256_file(Path(tiny_path) / name) == digest


def test_unguarded_model_shows_the_trap_the_guard_prevents(tiny_model_cfg):
    """Negative control: with the repack allowed, this CPU loses layer-0 gradients (so the test above
    can fail). On a CPU without AVX512-BF16 bitsandbytes never repacks and gradients survive."""
    import bitsandbytes as bnb
    from bitsandbytes.nn.modules import has_avx512bf16
    from peft import get_peft_model

    # bitsandbytes' per-call path: weights dequantized once never reach its kernels
    model, tok, _ = loading.load_base(dataclasses.replace(tiny_model_cfg, dequantize_max_gb=0))
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = True
    model = get_peft_model(model, loading.lora_config(LoraConfigSection(r=4, alpha=8, dropout=0.0)))
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
            loading.assert_bnb_guarded(model)


# ---------------------------------------------------------------------------------------------
# Speed paths: merged sampling weights, mixed precision, loader details


def _two_adapter_model(cfg):
    """Tiny NF4 base with two active LoRA adapters whose B matrices are non-zero (so both deltas count)."""
    from peft import get_peft_model

    model, tok, _ = loading.load_base(cfg)
    torch.manual_seed(0)
    pm = get_peft_model(model, loading.lora_config(LoraConfigSection(r=4, alpha=8, dropout=0.0)), adapter_name="one")
    pm.add_adapter("two", loading.lora_config(LoraConfigSection(r=2, alpha=8, dropout=0.0)))
    randomize_lora_b(pm, 0.2)
    stacking.set_active_adapters(pm, ["one", "two"])
    pm.eval()
    ids = torch.randint(5, tok.vocab_size - 1, (3, 12))
    return pm, ids


def test_merged_weights_equal_the_adapter_path_and_leave_the_model_unchanged(tiny_model_cfg_both):
    pm, ids = _two_adapter_model(tiny_model_cfg_both)
    fp32 = tiny_model_cfg_both.compute_dtype == "float32"

    def close(a, b):
        if fp32:  # the same sums in another order
            torch.testing.assert_close(a, b, atol=2e-5, rtol=0)
            return
        # bf16: W + BA rounded once to bf16 vs bf16 activations through the 4-bit kernel and LoRA. Compare
        # distributions: mean KL(merged || adapters) per position (0.003 nats on the embedded model).
        p, q = torch.log_softmax(a.float(), -1), torch.log_softmax(b.float(), -1)
        kl = (p.exp() * (p - q)).sum(-1).mean().item()
        assert kl < 0.01, kl
    with torch.no_grad():
        before = pm(input_ids=ids).logits
        with stacking.active_adapters(pm, None):
            base = pm(input_ids=ids).logits
        for _ in range(2):  # twice: a merge must not leak into the next one
            with stacking.merged_linear_weights(pm):
                merged = pm(input_ids=ids).logits
            close(merged.float(), before.float())
        with stacking.active_adapters(pm, None), stacking.merged_linear_weights(pm):
            close(pm(input_ids=ids).logits.float(), base.float())
        after = pm(input_ids=ids).logits
    assert torch.equal(after, before)
    assert (before - base).abs().max() > 1e-2  # the adapters matter, so the comparisons have teeth
    # every patched forward was removed; what stays is the load's own (4-bit layers dequantized once)
    assert all(hasattr(m, "dense_weight") for m in pm.modules() if "forward" in vars(m))


def test_merged_weights_copy_only_layers_with_an_adapter_to_merge(tiny_model_cfg_both, monkeypatch):
    """A layer with no active adapter samples from the load's dense copy as it is: no second copy (with
    the policy on the top layers, most of the model). Layers that merge get a copy of their own."""
    pm, ids = _two_adapter_model(tiny_model_cfg_both)
    copies = []
    real = stacking.dense_weight
    monkeypatch.setattr(stacking, "dense_weight", lambda layer: copies.append(layer) or real(layer))
    n_linear = sum(1 for m in pm.modules() if hasattr(m, "dense_weight"))
    assert n_linear > 0
    with torch.no_grad():
        with stacking.active_adapters(pm, None), stacking.merged_linear_weights(pm):
            pm(input_ids=ids)
        assert copies == []
        with stacking.merged_linear_weights(pm):
            pm(input_ids=ids)
    assert len(copies) == n_linear  # every linear carries an adapter in this model


def test_dense_weight_bytes_counts_logical_weights(tiny_model_cfg):
    pm, _ = _two_adapter_model(tiny_model_cfg)
    import bitsandbytes as bnb

    logical = sum(m.weight.quant_state.shape.numel() for m in pm.modules() if isinstance(m, bnb.nn.Linear4bit))
    assert stacking.dense_weight_bytes(pm, torch.bfloat16) == 2 * logical
    assert stacking.dense_weight_bytes(pm, torch.float32) == 4 * logical


def test_bf16_compute_keeps_fp32_lora_masters_and_restores_peft_casting(tiny_model_cfg):
    from peft.tuners.tuners_utils import BaseTunerLayer

    cfg = ModelConfig(**{**tiny_model_cfg.__dict__, "compute_dtype": "bfloat16"})
    pm, ids = _two_adapter_model(cfg)
    assert pm.get_input_embeddings().weight.dtype == torch.bfloat16
    lora = [p for n, p in pm.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    layers = [m for m in pm.modules() if isinstance(m, BaseTunerLayer)]
    with loading.compute_context(pm):
        assert torch.is_autocast_enabled("cpu") and not any(m.cast_input_dtype_enabled for m in layers)
        logits = pm(input_ids=ids).logits
    assert all(m.cast_input_dtype_enabled for m in layers) and not torch.is_autocast_enabled("cpu")
    assert logits.dtype == torch.bfloat16
    # float32 models run unchanged
    pm32, _ = _two_adapter_model(tiny_model_cfg)
    with loading.compute_context(pm32):
        assert not torch.is_autocast_enabled("cpu")


def test_loader_defaults_to_eager_attention_on_cpu_and_copies_parameters_out_of_the_file(tiny_model_cfg):
    model, _, _ = loading.load_base(tiny_model_cfg)
    assert model.config._attn_implementation == "eager"
    cfg = ModelConfig(**{**tiny_model_cfg.__dict__, "attn_implementation": "sdpa"})
    assert loading.load_base(cfg)[0].config._attn_implementation == "sdpa"
    # No parameter may still view the memory-mapped weights file: it would keep the file's pages resident.
    import gc
    import sys

    gc.collect()
    if sys.platform.startswith("linux"):
        weights = str(sorted(Path(embedded.resolve_model_path(tiny_model_cfg.name)).glob("*.safetensors"))[0])
        assert weights not in Path("/proc/self/maps").read_text()


def test_merged_weights_leave_dora_layers_on_their_adapters(tiny_model_cfg):
    from peft import LoraConfig, get_peft_model

    model, tok, _ = loading.load_base(tiny_model_cfg)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_dora=True,
                                          target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    randomize_lora_b(pm, 0.3)
    pm.eval()
    ids = torch.randint(5, tok.vocab_size - 1, (2, 9))
    own = {n: vars(m).get("forward") for n, m in pm.named_modules()}  # the load's (4-bit weights dequantized once)
    with torch.no_grad():
        want = pm(input_ids=ids).logits
        with stacking.merged_linear_weights(pm):
            patched = [n for n, m in pm.named_modules() if vars(m).get("forward") is not own[n]]
            got = pm(input_ids=ids).logits
        with stacking.active_adapters(pm, None):
            base = pm(input_ids=ids).logits
    assert not any("q_proj" in n or "v_proj" in n for n in patched) and patched  # other 4-bit layers merged
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    assert (want - base).abs().max() > 1e-3


def test_sampler_logprobs_equal_a_forward_over_the_sampled_rows(tiny_model_cfg):
    """Eval takes the model's side of its KL from the sampler (float32): the logprob it keeps for each
    drawn token must be what forward_response gives over the same rows, through the adapters and from
    merged weights alike, with left padding, and 0 past each row's stop token."""
    from pipeline.models import forwards
    from pipeline.rl import rollout

    pm, _ = _two_adapter_model(tiny_model_cfg)
    _, tok, _ = loading.load_base(tiny_model_cfg)
    query, query_mask = forwards.left_pad([[7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]], tok.pad_token_id)
    stop = [int(i) for i in torch.randint(5, tok.vocab_size - 1, (20,))]  # some rows stop early
    draws = {}
    for merge in (False, True):
        weights = stacking.merged_linear_weights(pm) if merge else torch.no_grad()
        with weights:
            drawn = draws[merge] = rollout.sample(pm, tok, query, query_mask, 12, 0.7, stop, generator_seed=5,
                                                  with_logprobs=True)
        with torch.no_grad():
            want = forwards.forward_response(pm, query, query_mask, drawn.response, drawn.mask.float(), 0.7).logprobs
        assert drawn.logprobs.shape == drawn.response.shape
        torch.testing.assert_close(drawn.logprobs, want * drawn.mask, atol=2e-5, rtol=0)
        assert (drawn.logprobs[~drawn.mask.bool()] == 0).all()
        assert drawn.logprobs[drawn.mask.bool()].lt(-1e-3).any()  # real draws, not all-certain tokens
    # keeping the logprobs does not change what is drawn: the plain call gives the same tokens from the seed
    resp, mask, _ = rollout.generate(pm, tok, query, query_mask, 12, 0.7, stop, generator_seed=5)
    assert torch.equal(resp, draws[False].response) and torch.equal(mask, draws[False].mask)


def test_sampling_attention_is_sdpa_on_cpu_and_draws_what_eager_draws(tiny_model_cfg):
    """"auto" loads eager attention on CPU (training); sampling switches to sdpa and back, drawing the
    same tokens with the same logprobs (to float round-off) as sampling under eager."""
    from pipeline.models import forwards
    from pipeline.rl import rollout

    pm, _ = _two_adapter_model(tiny_model_cfg)
    _, tok, _ = loading.load_base(tiny_model_cfg)
    inner = pm.get_base_model()
    assert inner.config._attn_implementation == "eager"
    seen = []
    with loading.decode_attention(pm):
        seen.append(inner.config._attn_implementation)
    assert seen == ["sdpa"] and inner.config._attn_implementation == "eager"
    query, query_mask = forwards.left_pad([[7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]], tok.pad_token_id)
    with torch.no_grad():
        fast = rollout.sample(pm, tok, query, query_mask, 12, 0.7, [], generator_seed=3, with_logprobs=True)
        inner._rlhf_decode_attn = None  # as with model.attn_implementation=eager: no switch
        plain = rollout.sample(pm, tok, query, query_mask, 12, 0.7, [], generator_seed=3, with_logprobs=True)
    assert torch.equal(fast.response, plain.response)
    torch.testing.assert_close(fast.logprobs, plain.logprobs, atol=2e-5, rtol=0)
    # an explicit choice is kept: no switch where the config names the implementation
    cfg = dataclasses.replace(tiny_model_cfg, attn_implementation="eager")
    model, _, _ = loading.load_base(cfg)
    with loading.decode_attention(model):
        assert model.config._attn_implementation == "eager"


def test_eval_kl_with_a_merged_reference_equals_the_adapter_path(tiny_model_cfg):
    """In float32 eval takes the model's side of the KL from the sampler and runs the reference from merged
    weights (pipeline/stages/evaluate.py _sample); the per-sequence KL equals the one computed through the
    adapters, on the same drawn tokens, to round-off."""
    from pipeline.rl import rollout
    from pipeline.stages import evaluate

    pm, _ = _two_adapter_model(tiny_model_cfg)
    _, tok, _ = loading.load_base(tiny_model_cfg)
    encoded = [[7, 8, 9, 10, 11], [7, 8, 9, 12], [7, 8, 13, 14, 15, 16]]
    stack = evaluate.Stack(None, pm, tok, None, {}, {}, reference=["one"], start=["one"])
    out = {}
    for merged in (False, True):
        plan = evaluate.SamplingPlan(encoded, 2, 0.7, 8, rollout.stop_token_ids(tok, pm), 6, merged=merged,
                                     float32=True)
        out[merged] = evaluate._sample(stack, plan, ["one", "two"], 2, seed=3, desc="test")
    assert out[True].response_ids == out[False].response_ids
    kl = {m: torch.tensor(s.kl_k1) for m, s in out.items()}
    assert kl[False].abs().max() > 1e-2  # the two adapters differ: a KL to compare
    torch.testing.assert_close(kl[True], kl[False], atol=1e-4, rtol=0)
    # k3 sums exp(log-ratio) terms, large where the adapters disagree: round-off relative to its size
    torch.testing.assert_close(torch.tensor(out[True].kl_k3), torch.tensor(out[False].kl_k3), atol=1e-4, rtol=1e-4)


def test_heap_trim_trims_first_then_only_after_the_margin(monkeypatch):
    """HeapTrim trims at its first call, then only once the resident set has grown past the last trim's
    size + margin; where the size cannot be read it trims every time."""
    rss = iter([1000, 900,  # first call: trims (size after: 900)
                1800,  # 900 + 1 MiB margin (1,048,576 bytes) is not passed: no trim
                900 + 2**20 + 1, 950,  # passed by 1 byte: trims (size after: 950)
                950 + 2**20])  # not passed (equal): no trim
    trims = []
    monkeypatch.setattr(loading, "resident_bytes", lambda: next(rss))
    monkeypatch.setattr(loading, "release_free_memory", lambda: trims.append(1))
    trim = loading.HeapTrim(margin_mb=1)
    assert [trim() for _ in range(4)] == [True, False, True, False]
    assert len(trims) == 2 and trim.floor == 950
    monkeypatch.setattr(loading, "resident_bytes", lambda: None)
    assert trim() and trim()
    assert len(trims) == 4


def test_resident_bytes_reads_this_process():
    rss = loading.resident_bytes()
    assert rss is None or 10 * 2**20 < rss < 64 * 2**30


def test_response_logprobs_through_the_fused_head_equal_the_model_logits(tiny_model_cfg_both):
    """forwards.response_outputs computes the LM head and the log-softmax in one function; its log-probabilities,
    entropies and the hidden states' gradient equal those of the model's own logits (lm_head(h / T))."""
    from peft import get_peft_model

    from pipeline.models import forwards
    from pipeline.rl import ppo_math

    model, tok, _ = loading.load_base(tiny_model_cfg_both)
    pm = get_peft_model(model, loading.lora_config(LoraConfigSection(r=4, alpha=8, dropout=0.0)))
    randomize_lora_b(pm, 0.3)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 5, model.config.hidden_size, generator=g).to(model.get_input_embeddings().weight.dtype)
    tokens = torch.randint(0, model.config.vocab_size, (3, 5), generator=g)
    h_fused, h_plain = h.clone().requires_grad_(True), h.clone().requires_grad_(True)
    got = forwards.response_outputs(pm, h_fused, tokens, 0.7, with_entropy=True)
    with loading.compute_context(pm):
        logits = pm.get_output_embeddings()(h_plain / 0.7)
    want, want_entropy = ppo_math.token_logprobs_and_entropy(logits, tokens, with_entropy=True)
    bf16 = tiny_model_cfg_both.compute_dtype == "bfloat16"
    # the same logits; the logsumexp summed block by block (online), so equal to float round-off
    torch.testing.assert_close(got.logprobs, want, atol=1e-5, rtol=0.0)
    torch.testing.assert_close(got.entropy, want_entropy, atol=1e-4, rtol=0.0)
    got.logprobs.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(h_fused.grad.float(), h_plain.grad.float(), atol=3e-2 if bf16 else 1e-5, rtol=0.0)
    with torch.no_grad():  # and without a graph, bit for bit (the KL-0 invariant of PPO's step 1)
        assert torch.equal(forwards.response_outputs(pm, h, tokens, 0.7).logprobs, got.logprobs.detach())
