"""Fuse stage: one adapter (and a merged model) that reproduces base + sft + ppo stacked, numerically."""
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import randomize_lora_b

from pipeline.artifacts import hashing
from pipeline.artifacts.outputs import ArtifactError, write_manifest
from pipeline.config import ModelConfig, PipelineConfig
from pipeline.fusion import lora_state
from pipeline.models import embedded, loading, stacking
from pipeline.stages import fuse

TINY = "embedded:tiny-random-llama"
TOL = 1e-4
SFT_DATA = {"train": {"source": "data/sft_train.jsonl", "sha256": "a" * 64, "rows": 10}}
PPO_DATA = {"prompts": {"source": "data/prompts_train.jsonl", "sha256": "b" * 64, "rows": 8}}


@dataclass
class Run:
    dir: Path
    ids: torch.Tensor
    base: torch.Tensor  # NF4 base logits
    sft: torch.Tensor  # NF4 base + sft
    stacked: torch.Tensor  # NF4 base + sft + ppo (the PPO policy)
    full_stacked: torch.Tensor  # full-precision base + sft + ppo


def _pipeline_cfg(**fuse_overrides) -> PipelineConfig:
    cfg = PipelineConfig(model=ModelConfig(name=TINY))  # auto precision: the fuse stage checks in float32
    for k, v in fuse_overrides.items():
        setattr(cfg.fuse, k, v)
    return cfg


def _logits(model, ids) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _nf4_base():
    return loading.load_base(ModelConfig(name=TINY, compute_dtype="float32"))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    """RUN/sft and RUN/ppo as the stages write them: different r, alpha (sft with rsLoRA), targets and layers."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)  # lora_A's init: module fixtures run before the autouse per-test seed
    run_dir = tmp_path_factory.mktemp("run")
    model, tok, info = _nf4_base()
    ids = tok(fuse.PROBE_TEXT, return_tensors="pt").input_ids
    base_logits = _logits(model, ids)
    sft_cfg = LoraConfig(r=4, lora_alpha=8, use_rslora=True, lora_dropout=0.05, task_type="CAUSAL_LM",
                         target_modules=["q_proj", "v_proj", "up_proj"])
    ppo_cfg = LoraConfig(r=2, lora_alpha=3, lora_dropout=0.0, task_type="CAUSAL_LM",
                         target_modules=["q_proj", "o_proj", "down_proj"], layers_to_transform=[1])
    pm = get_peft_model(model, sft_cfg, adapter_name="sft")
    pm.add_adapter("ppo", ppo_cfg)
    randomize_lora_b(pm, 0.3, torch.Generator().manual_seed(7))
    pcfg = _pipeline_cfg()
    stacking.save_adapter(pm, "sft", run_dir / "sft")
    write_manifest(run_dir / "sft", "sft", pcfg, info, metrics={"train_loss": 1.25}, data=SFT_DATA)
    stacking.save_adapter(pm, "ppo", run_dir / "ppo")
    sft_sha = hashing.sha256_file(run_dir / "sft" / lora_state.ADAPTER_FILE)
    write_manifest(run_dir / "ppo", "ppo", pcfg, info, metrics={"ppo/score": 0.5}, data=PPO_DATA,
                   adapters={"sft": {"path": str(run_dir / "sft"), "sha256": sft_sha}},
                   extra={"stacked_on": ["sft"]})
    with stacking.active_adapters(pm, ["sft"]):
        sft_logits = _logits(pm, ids)
    with stacking.active_adapters(pm, ["sft", "ppo"]):
        stacked = _logits(pm, ids)
    full, _, _ = loading.load_base(ModelConfig(name=TINY, load_in_4bit=False, compute_dtype="float32"))
    full_stacked = _logits(stacking.stack_adapters(full, {"sft": run_dir / "sft", "ppo": run_dir / "ppo"}), ids)
    return Run(run_dir, ids, base_logits, sft_logits, stacked, full_stacked)


@pytest.fixture(scope="module")
def fused_cat(run) -> Path:
    return fuse.run_fuse(_pipeline_cfg(), run.dir)


def test_cat_adapter_reproduces_stacked_adapters_in_nf4(run, fused_cat):
    from peft import PeftModel

    assert (run.stacked - run.base).abs().max() > 0.5 and (run.stacked - run.sft).abs().max() > 0.1
    base, _, _ = _nf4_base()
    loaded = PeftModel.from_pretrained(base, str(fused_cat / "adapter"))  # plain peft, nothing of ours
    diff = (_logits(loaded, run.ids) - run.stacked).abs().max().item()
    print(f"cat fused vs stacked (NF4): max |logit diff| = {diff:.2e}")
    assert diff < TOL
    config = json.loads((fused_cat / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"], config["use_rslora"]) == (6, 6, 0.0, False)
    # union: sft q,v,up in layers 0 and 1; ppo q,o,down in layer 1 only
    layer = {f"model.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj")}
    assert set(config["target_modules"]) == layer | {"model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj"}


def test_cat_manifest_records_sources_and_checks(run, fused_cat):
    manifest = json.loads((fused_cat / "manifest.json").read_text())
    assert manifest["stage"] == "fuse" and manifest["method"] == "cat" and manifest["weights"] == [1.0, 1.0]
    for stage in ("sft", "ppo"):
        assert manifest["adapters"][stage]["sha256"] == hashing.sha256_file(run.dir / stage / lora_state.ADAPTER_FILE)
    assert manifest["data"]["sft:train"]["source"] == "data/sft_train.jsonl"
    assert manifest["metrics"]["max_abs_logit_diff_vs_stacked"] < TOL
    assert manifest["metrics"]["delta_rel_error_vs_weighted_sum"] < 1e-6
    assert manifest["metrics"]["merged_max_abs_logit_diff_vs_unmerged"] < TOL
    assert (fused_cat / "config.yaml").is_file() and sorted(manifest["outputs"]) == ["adapter", "merged"]
    with pytest.raises(ArtifactError, match="already holds"):
        fuse.run_fuse(_pipeline_cfg(), run.dir)


def test_merged_model_loads_with_plain_transformers_and_reproduces_the_nf4_policy(run, fused_cat):
    """The merged model starts from the dequantized NF4 base the adapters were trained on."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged_dir = fused_cat / "merged"
    model = AutoModelForCausalLM.from_pretrained(str(merged_dir))
    assert next(model.parameters()).dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None
    logits = _logits(model, run.ids)
    diff = (logits - run.stacked).abs().max().item()
    print(f"merged (plain transformers) vs NF4 base + stacked adapters: max |logit diff| = {diff:.2e}")
    assert diff < TOL
    # Not the original float weights: those differ from what the adapters were trained on.
    assert (logits - run.full_stacked).abs().max().item() > 100 * TOL
    tok = AutoTokenizer.from_pretrained(str(merged_dir))
    assert tok.chat_template == embedded.CHATML_TEMPLATE
    card = (merged_dir / "README.md").read_text()
    for text in (TINY, "sft", "ppo", "data/sft_train.jsonl", "data/prompts_train.jsonl", "`cat`", "NF4"):
        assert text in card


def _adapter(modules: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    state = {}
    for m, (a, b) in modules.items():
        state[f"base_model.model.{m}.lora_A.weight"], state[f"base_model.model.{m}.lora_B.weight"] = a, b
    return state


def test_cat_lora_math_by_hand():
    """delta = sum_i w_i s_i B_i A_i with zero blocks where an adapter lacks a module; rsLoRA and alpha_pattern."""
    from peft import LoraConfig

    g = torch.Generator().manual_seed(0)
    a1, b1, a1m, b1m = (torch.randn(s, generator=g) for s in ((2, 3), (4, 2), (2, 3), (4, 2)))
    a2, b2 = torch.randn(1, 3, generator=g), torch.randn(4, 1, generator=g)
    c1 = LoraConfig(r=2, lora_alpha=4, target_modules=["m1", "m2"], alpha_pattern={"m2": 8})  # s = 2, m2: 4
    c2 = LoraConfig(r=1, lora_alpha=3, target_modules=["m1"], use_rslora=True)  # s = 3 / sqrt(1) = 3
    config, state = lora_state.cat_lora([c1, c2], [_adapter({"m1": (a1, b1), "m2": (a1m, b1m)}), _adapter({"m1": (a2, b2)})],
                                  weights=[0.5, -2.0])
    assert (config.r, config.lora_alpha, config.use_rslora, config.lora_dropout) == (3, 3, False, 0.0)
    got = lora_state.lora_deltas(config, state)
    torch.testing.assert_close(got["m1"], 0.5 * 2 * b1 @ a1 - 2.0 * 3 * b2 @ a2)
    torch.testing.assert_close(got["m2"], 0.5 * 4 * b1m @ a1m)
    assert state["base_model.model.m2.lora_A.weight"][2:].abs().sum() == 0  # adapter 2's block: zeros


@pytest.mark.parametrize("change, message", [({"bias": "all"}, "bias"), ({"use_dora": True}, "DoRA"),
                                             ({"task_type": "SEQ_CLS"}, "reward model"),
                                             ({"modules_to_save": ["score"]}, "modules_to_save")])
def test_unsupported_adapters_are_refused(change, message):
    from peft import LoraConfig

    config = LoraConfig(**{"r": 2, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM", **change})
    with pytest.raises(lora_state.FuseError, match=message):
        lora_state.check_lora_config(config, "adapter x")


def test_linear_of_two_copies_reproduces_the_adapter(run, tmp_path):
    """peft's linear puts sqrt(w s) on A and on B: two copies at w=0.25 with s=4 give 2A, 2B (scaling 1) = sft."""
    from peft import PeftModel

    sft = str(run.dir / "sft")
    out = fuse.run_fuse(_pipeline_cfg(method="linear", adapters=[sft, sft], weights=[0.25, 0.25], merged=False),
                        tmp_path)
    fused, source = lora_state.load_lora_state(out / "adapter"), lora_state.load_lora_state(run.dir / "sft")
    assert fused.keys() == source.keys()
    for key in source:
        torch.testing.assert_close(fused[key], 2 * source[key])
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 4, False)  # peft kept rsLoRA: x2 off
    base, _, _ = _nf4_base()
    diff = (_logits(PeftModel.from_pretrained(base, str(out / "adapter")), run.ids) - run.sft).abs().max().item()
    print(f"linear(sft, sft; 0.25, 0.25) vs sft (NF4): max |logit diff| = {diff:.2e}")
    assert diff < TOL
    # exact weighted sum would be 0.25 + 0.25 = half the sft delta; we got the whole delta: relative error 1
    assert json.loads((out / "manifest.json").read_text())["metrics"]["delta_rel_error_vs_weighted_sum"] == \
        pytest.approx(1.0, abs=1e-5)


def test_svd_gives_the_best_low_rank_approximation(run, tmp_path):
    from peft import LoraConfig

    out = fuse.run_fuse(_pipeline_cfg(method="svd", adapters=[str(run.dir / "sft"), str(run.dir / "ppo")],
                                      merged=False), tmp_path)
    fused_cfg = LoraConfig.from_pretrained(str(out / "adapter"))
    assert fused_cfg.r == 4  # peft's default svd rank: the largest source rank
    got = lora_state.lora_deltas(fused_cfg, lora_state.load_lora_state(out / "adapter"))
    sft = lora_state.lora_deltas(LoraConfig.from_pretrained(str(run.dir / "sft")), lora_state.load_lora_state(run.dir / "sft"))
    ppo = lora_state.lora_deltas(LoraConfig.from_pretrained(str(run.dir / "ppo")), lora_state.load_lora_state(run.dir / "ppo"))
    # modules of one source have rank <= 4: reproduced exactly
    torch.testing.assert_close(got["model.layers.0.self_attn.v_proj"], sft["model.layers.0.self_attn.v_proj"],
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got["model.layers.1.mlp.down_proj"], ppo["model.layers.1.mlp.down_proj"],
                               atol=1e-5, rtol=1e-4)
    # q_proj in layer 1 sums rank 4 + 2: the error is the Eckart-Young bound, sqrt(sigma_5^2 + sigma_6^2)
    q = "model.layers.1.self_attn.q_proj"
    want = sft[q] + ppo[q]
    bound = torch.linalg.svdvals(want)[4:].pow(2).sum().sqrt()
    assert bound > 1e-3
    assert torch.linalg.norm(got[q] - want) == pytest.approx(bound.item(), rel=1e-3)
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    assert 0 < metrics["delta_rel_error_vs_weighted_sum"] < 1 and metrics["max_abs_logit_diff_vs_stacked"] > 0


def test_adapter_from_another_base_is_refused(run, tmp_path):
    other = tmp_path / "other_sft"
    shutil.copytree(run.dir / "sft", other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["base"]["weights_sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="different base weights"):
        fuse.run_fuse(_pipeline_cfg(adapters=[str(other), str(run.dir / "ppo")]), tmp_path)
    assert not any(p.name.startswith((".fused", "fused")) for p in tmp_path.iterdir())


def test_ppo_without_its_sft_adapter_is_refused(run, tmp_path):
    with pytest.raises(lora_state.FuseError, match="trained stacked on"):
        fuse.run_fuse(_pipeline_cfg(adapters=[str(run.dir / "ppo")], weights=[1.0]), tmp_path)


def test_a_truncated_source_adapter_is_refused_by_name_before_fusing(run, tmp_path):
    """The issue's case at the fuse stage: a truncated adapter is named with the command that remakes it
    (the manifest's file list), not a safetensors error."""
    shutil.copytree(run.dir / "sft", tmp_path / "sft")
    weights = tmp_path / "sft" / lora_state.ADAPTER_FILE
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ArtifactError) as e:
        fuse.run_fuse(_pipeline_cfg(adapters=[str(tmp_path / "sft"), str(run.dir / "ppo")], weights=[1.0, 1.0]),
                      tmp_path / "out")
    assert str(e.value).startswith(f"{weights} is truncated (100 bytes; the manifest says {size}); remake it with: "
                                   f"rlhf sft --config ")
    assert str(e.value).endswith(f" --run-dir {tmp_path} --overwrite") and not (tmp_path / "out" / "fused").exists()
