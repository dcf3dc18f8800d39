"""Learned adapter fusion (pipeline/fusion/gating.py, pipeline/fusion/learned.py) on the tiny NF4 model.

The gated model must be exactly what it claims at the fixed points of its gate: one adapter == peft's
single adapter, zero gate == the stacked adapters, one-hot == the chosen adapter, all-zero == the base;
training changes only the gate; the saved artifact reloads to the same logits, also onto a plain
transformers model.
"""
import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from helpers import randomize_lora_b

from pipeline.artifacts import hashing
from pipeline.artifacts.outputs import write_manifest
from pipeline.config import ModelConfig, PipelineConfig, load_config
from pipeline.fusion import gating, lora_state
from pipeline.models import forwards, loading, stacking
from pipeline.rl import rollout
from pipeline.stages import fuse

TINY = "embedded:tiny-random-llama"


# ---------------------------------------------------------------------------------------------
# Pure math


def test_gate_weights_by_hand():
    # zero logits: K * softmax(0, 0) = 2 * (1/2, 1/2) = (1, 1)
    assert gating.gate_weights(torch.zeros(2)).tolist() == [1.0, 1.0]
    # logits (ln 3, 0): softmax = (3/4, 1/4), times K = 2 -> (1.5, 0.5)
    got = gating.gate_weights(torch.tensor([math.log(3.0), 0.0]))
    assert torch.allclose(got, torch.tensor([1.5, 0.5]), atol=1e-6)
    # K = 1 is always exactly 1, whatever the logit
    assert gating.gate_weights(torch.tensor([[7.5], [-3.0]])).tolist() == [[1.0], [1.0]]


def test_mix_deltas_by_hand():
    base = torch.tensor([[1.0, 2.0]])
    deltas = [torch.tensor([[1.0, 1.0]]), torch.tensor([[10.0, 0.0]])]
    gates = torch.tensor([[0.5, 2.0]])
    # (1 + 0.5*1 + 2*10, 2 + 0.5*1 + 2*0) = (21.5, 2.5)
    assert gating.mix_deltas(base, deltas, gates).tolist() == [[21.5, 2.5]]
    with pytest.raises(ValueError, match="2 gate weights for 1"):
        gating.mix_deltas(base, deltas[:1], gates)


def test_masked_gate_mean_by_hand():
    gates = torch.tensor([[[1.0, 1.0], [2.0, 0.0], [0.5, 1.5]]])  # (B=1, T=3, K=2)
    s, n = gating.masked_gate_mean(gates, torch.tensor([[0, 1, 1]]))
    # tokens 1 and 2: sums (2 + 0.5, 0 + 1.5) = (2.5, 1.5) over 2 tokens
    assert s.tolist() == [2.5, 1.5] and n == 2.0
    s, n = gating.masked_gate_mean(gates, None)
    assert s.tolist() == [3.5, 2.5] and n == 3.0


def test_best_per_prompt_and_layer_means_by_hand():
    from pipeline.fusion.learned import best_per_prompt, layer_means

    assert best_per_prompt([0.1, 0.9, 0.3, 0.5, 0.5, 0.2], 3) == [1, 3]  # ties: the first
    means = layer_means({"model.layers.0.q": [1.2, 0.8], "model.layers.0.v": [1.0, 1.0], "model.layers.1.q": [0.5]},
                        {"model.layers.0.q": ["sft", "ppo"], "model.layers.0.v": ["sft", "ppo"],
                         "model.layers.1.q": ["ppo"]}, ["sft", "ppo"])
    # layer 0: sft (1.2 + 1.0) / 2 = 1.1, ppo (0.8 + 1.0) / 2 = 0.9; layer 1 has only ppo
    assert means["layers"] == [0, 1]
    assert means["sft"] == [pytest.approx(1.1), None] and means["ppo"] == [pytest.approx(0.9), 0.5]


# ---------------------------------------------------------------------------------------------
# On the tiny NF4 model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """RUN/sft and RUN/ppo as the stages write them (different ranks, targets; ppo on one layer)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("fusion_run")
    model, tok, info = loading.load_base(ModelConfig(name=TINY, compute_dtype="float32"))
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM",
                                          target_modules=["q_proj", "v_proj", "up_proj"]), adapter_name="sft")
    pm.add_adapter("ppo", LoraConfig(r=2, lora_alpha=3, task_type="CAUSAL_LM",
                                     target_modules=["q_proj", "o_proj", "down_proj"], layers_to_transform=[1]))
    randomize_lora_b(pm, 0.3, torch.Generator().manual_seed(7))
    cfg = PipelineConfig(model=ModelConfig(name=TINY))
    stacking.save_adapter(pm, "sft", run / "sft")
    write_manifest(run / "sft", "sft", cfg, info, metrics={})
    stacking.save_adapter(pm, "ppo", run / "ppo")
    write_manifest(run / "ppo", "ppo", cfg, info, metrics={},
                   adapters={"sft": {"path": str(run / "sft"),
                                     "sha256": hashing.sha256_file(run / "sft" / lora_state.ADAPTER_FILE)}},
                   extra={"stacked_on": ["sft"]})
    return run


@pytest.fixture
def loaded(stages):
    """A fresh NF4 base (float32 compute) with sft and ppo loaded; and probe ids."""
    model, tok, _ = loading.load_base(ModelConfig(name=TINY, compute_dtype="float32"))
    pm = stacking.stack_adapters(model, {"sft": stages / "sft", "ppo": stages / "ppo"})
    pm.eval()
    ids = tok(fuse.PROBE_TEXT, return_tensors="pt").input_ids
    return pm, ids


def test_one_adapter_with_its_gate_equals_peft_exactly(loaded):
    pm, ids = loaded
    with stacking.active_adapters(pm, ["sft"]):
        peft_logits = _logits(pm, ids)
    gates = gating.for_model(pm, ["sft"])
    with gating.gated(pm, gates, ["sft"]):
        got = _logits(pm, ids)
    assert torch.equal(got, peft_logits)


def test_zero_gate_equals_stacked_adapters(loaded):
    pm, ids = loaded
    with stacking.active_adapters(pm, ["sft", "ppo"]):
        stacked = _logits(pm, ids)
    with stacking.active_adapters(pm, ["sft"]):
        sft_only = _logits(pm, ids)
    gates = gating.for_model(pm, ["sft", "ppo"])
    assert sum(p.numel() for p in gates.parameters()) > 0 and all(not p.any() for p in gates.parameters())
    with gating.gated(pm, gates, ["sft", "ppo"]):
        got = _logits(pm, ids)
    assert (got - stacked).abs().max() < 1e-5
    assert (sft_only - stacked).abs().max() > 0.1  # the ppo adapter matters: the check can fail


@pytest.mark.parametrize("weights, adapters", [([1.0, 0.0], ["sft"]), ([0.0, 1.0], ["ppo"]), ([0.0, 0.0], None)])
def test_fixed_gates_equal_the_chosen_adapter_or_the_base(loaded, weights, adapters):
    pm, ids = loaded
    with stacking.active_adapters(pm, adapters):
        want = _logits(pm, ids)
    gates = gating.for_model(pm, ["sft", "ppo"])
    gates.set_fixed(weights)
    with gating.gated(pm, gates, ["sft", "ppo"]):
        got = _logits(pm, ids)
    assert (got - want).abs().max() < 1e-5


def test_gated_context_restores_the_layers(loaded):
    pm, ids = loaded
    with stacking.active_adapters(pm, ["sft", "ppo"]):
        before = _logits(pm, ids)
    gates = gating.for_model(pm, ["sft", "ppo"])
    gates.set_fixed([0.0, 0.0])
    with gating.gated(pm, gates, ["sft", "ppo"]):
        pass
    assert not any("forward" in vars(m) for m in gating.lora_layers(pm).values())
    with stacking.active_adapters(pm, ["sft", "ppo"]):
        assert torch.equal(_logits(pm, ids), before)


def test_gates_are_per_token(loaded):
    """A gate that depends on the input gives different weights to different tokens, and the output at
    a token does not depend on later tokens (causal: generation with a KV cache stays exact)."""
    pm, ids = loaded
    gates = gating.for_model(pm, ["sft", "ppo"])
    torch.manual_seed(3)
    with torch.no_grad():
        for p in gates.parameters():
            p.normal_(0, 2.0)
    with gating.gated(pm, gates, ["sft", "ppo"]), gates.recording():
        full = _logits(pm, ids)
        prefix = _logits(pm, ids[:, :5])
    assert (full[:, :5] - prefix).abs().max() < 1e-4
    g = next(g for _, g in gates.items() if len(g.adapters) == 2)  # q_proj of layer 1 holds both
    x = torch.randn(2, 3, g.weight.shape[1])
    w = g(x)
    assert w.shape == (2, 3, len(g.adapters)) and torch.allclose(w.sum(-1), torch.full((2, 3), float(len(g.adapters))))
    assert w.std(dim=(0, 1)).max() > 0.01


def _fuse_cfg(tmp_run: Path, **fuse_overrides) -> PipelineConfig:
    cfg = load_config("configs/tiny.yaml", [
        "fuse.method=learned", "fuse.prompts=4", "fuse.samples_per_prompt=2", "fuse.sft_rows=4", "fuse.epochs=2",
        "fuse.batch_size=4", "fuse.learning_rate=0.05", "fuse.merged=false", "model.compute_dtype=float32",
        "ppo.max_new_tokens=6", "ppo.rewards=[{name: sentiment}]"]
        + [f"fuse.{k}={v}" for k, v in fuse_overrides.items()])
    return cfg


@pytest.fixture(scope="module")
def learned_run(stages, tmp_path_factory):
    """`rlhf fuse` with fuse.method=learned on the tiny stages (float32 compute, a text reward)."""
    run = tmp_path_factory.mktemp("learned")
    for stage in ("sft", "ppo"):
        (run / stage).symlink_to(stages / stage)
    cfg = _fuse_cfg(run)
    out = fuse.run_fuse(cfg, run)
    return run, out


def _digest(folder: Path) -> str:
    return hashlib.sha256((folder / lora_state.ADAPTER_FILE).read_bytes()).hexdigest()


def test_learned_fusion_artifact(learned_run, stages):
    run, out = learned_run
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "fuse" and manifest["method"] == "learned"
    m = manifest["metrics"]
    assert m["max_abs_logit_diff_init_vs_stacked"] < 1e-3
    assert m["max_abs_logit_diff_reload"] == 0.0
    assert m["frozen_tensors_unchanged"] is True
    assert m["train_steps"] == 2 * math.ceil((m["policy_rows"]["kept"] + m["sft_rows"]["rows"]) / 4)
    meta = json.loads((out / gating.FUSION_FILE).read_text())
    assert meta["format"] == gating.FORMAT and meta["adapters"] == ["sft", "ppo"]
    # the frozen adapters are byte copies of the stage outputs
    for name in ("sft", "ppo"):
        assert _digest(out / gating.ADAPTERS_DIR / name) == _digest(stages / name)
    # only the gates trained: they moved off zero
    from safetensors.torch import load_file

    gate = load_file(str(out / gating.GATE_FILE))
    assert max(float(t.abs().max()) for t in gate.values()) > 1e-3
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == m["train_steps"] and all(math.isfinite(r["fuse/loss"]) for r in rows)
    assert (out / "gate_weights.png").read_bytes()[:4] == b"\x89PNG"
    assert "MEAN GATE" in (out / "adapter" / "README.md").read_text()
    assert "gating.load" in (out / "README.md").read_text()
    # the mean-gate approximation is a distance from the learned fusion, not zero by construction
    assert m["kl_per_token_mean_gate_vs_learned"] >= 0.0 and m["kl_per_token_stacked_vs_learned"] > 0.0


def test_training_changes_only_gate_parameters(stages, tmp_path):
    """Adapter tensors and the packed NF4 bytes are byte-identical before and after training the gate."""
    from pipeline.fusion.learned import train_learned

    cfg = _fuse_cfg(tmp_path, epochs=1)
    for stage in ("sft", "ppo"):
        (tmp_path / stage).symlink_to(stages / stage)
    model, tok, base = loading.load_base(cfg.model)
    sources = lora_state.read_sources([tmp_path / "sft", tmp_path / "ppo"], base)
    pm = stacking.stack_adapters(model, {s.name: s.path for s in sources})
    pm.eval()

    def snapshot():
        return {n: t.detach().clone() for n, t in pm.state_dict().items()
                if "lora_" in n and (".sft." in n or ".ppo." in n) or "lora_" not in n}

    before = snapshot()
    nf4 = [n for n, t in before.items() if t.dtype == torch.uint8 and n.endswith(".weight")]
    assert nf4  # the packed 4-bit weights are among what is compared
    ids = tok(fuse.PROBE_TEXT, return_tensors="pt").input_ids
    stacked = fuse.probe_logits(pm, ids, ["sft", "ppo"])
    out = tmp_path / "out"
    out.mkdir()
    train_learned(cfg, tmp_path, sources, pm, tok, base, out, ids, stacked)
    after = snapshot()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before)


def _attached(out: Path, stages: Path):
    """A fresh NF4 base with the SFT adapter and the saved fusion ``out`` attached: (model, tok, probe ids,
    gates, slots)."""
    model, tok, _ = loading.load_base(ModelConfig(name=TINY, compute_dtype="float32"))
    pm = stacking.stack_adapters(model, {"sft": stages / "sft"})
    gates, slots = gating.attach(pm, out, prefix="f_")
    return pm, tok, tok(fuse.PROBE_TEXT, return_tensors="pt").input_ids, gates, slots


def test_saved_fusion_reproduces_logits_on_a_plain_transformers_model(learned_run, stages):
    """gating.attach into the pipeline's PeftModel and gating.load onto a bare transformers model agree,
    and the fused model generates (the PPO/eval sampling path, rollout.generate)."""
    _, out = learned_run
    pm, tok, ids, gates, slots = _attached(out, stages)
    with gating.gated(pm, gates, slots):
        attached = _logits(pm, ids)
        q, qm = forwards.left_pad([ids[0, :6].tolist()], tok.pad_token_id)
        r1, _, _ = rollout.generate(pm, tok, q, qm, 5, 1.0, generator_seed=1)
    with stacking.active_adapters(pm, ["sft"]):
        sft_logits = _logits(pm, ids)
    assert (attached - sft_logits).abs().max() > 1e-3  # the fused model is not just the SFT adapter

    plain, _, _ = loading.load_base(ModelConfig(name=TINY, compute_dtype="float32"))
    fused = gating.load(plain, out)
    assert torch.equal(_logits(fused, ids), attached)
    r2, _, _ = rollout.generate(fused, tok, q, qm, 5, 1.0, generator_seed=1)
    assert torch.equal(r1, r2)


def test_learned_needs_training_rows():
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="nothing to train on"):
        load_config("configs/tiny.yaml", ["fuse.method=learned", "fuse.prompts=0", "fuse.sft_rows=0"])


def test_not_a_fusion_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a learned fusion"):
        gating.read(tmp_path)


def test_gate_logits_gradients_match_autograd():
    """The memory-saving gate linear has the gradients of plain F.linear on a float32 copy of x."""
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 3, 5, dtype=dtype, requires_grad=True)
        w = torch.randn(2, 5, requires_grad=True)
        b = torch.randn(2, requires_grad=True)
        up = torch.randn(2, 3, 2)
        (gating._GateLogits.apply(x, w, b) * up).sum().backward()
        got = (x.grad.clone(), w.grad.clone(), b.grad.clone())
        x2, w2, b2 = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
        (torch.nn.functional.linear(x2.float(), w2, b2) * up).sum().backward()
        assert torch.allclose(got[1], w2.grad, atol=1e-5) and torch.allclose(got[2], b2.grad, atol=1e-6)
        assert torch.allclose(got[0].float(), x2.grad.float(), atol=1e-2 if dtype == torch.bfloat16 else 1e-6)


def test_readme_fusion_example_runs(learned_run, capsys):
    """The README's plain-transformers loading example, executed as written (tiny model, this run's folder)."""
    import re

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"<!-- fusion-example:start -->\s*```python\n(.*?)```\s*<!-- fusion-example:end -->", text, re.S)
    assert block, "README lost its fusion example markers"
    _, out = learned_run
    code = block.group(1).replace("embedded:smollm2-135m-instruct", TINY).replace("runs/default/fused", str(out))
    scope: dict = {}
    exec(compile(code, "README fusion example", "exec"), scope)
    from safetensors.torch import load_file

    saved = load_file(str(out / gating.GATE_FILE))
    path, gate = next(iter(scope["model"].fusion.items()))
    assert torch.equal(gate.weight, saved[f"{path}.weight"])
    assert "forward" in vars(gating.lora_layers(scope["model"])[path])  # the gates are installed


def test_mean_gate_adapter_is_the_fusion_with_its_mean_gate_fixed(learned_run, stages):
    """adapter/ (plain PeftModel.from_pretrained) equals the fusion with every gate fixed at its recorded
    mean: the approximation is exactly "a constant gate", and only that."""
    from peft import PeftModel

    _, out = learned_run
    meta = json.loads((out / gating.FUSION_FILE).read_text())
    pm, tok, ids, gates, slots = _attached(out, stages)
    with gating.gated(pm, gates, slots):
        learned = _logits(pm, ids)
    gates.set_fixed(meta["mean_gate"])
    with gating.gated(pm, gates, slots):
        fixed = _logits(pm, ids)
    plain, _, _ = loading.load_base(ModelConfig(name=TINY, compute_dtype="float32"))
    folded = PeftModel.from_pretrained(plain, str(out / "adapter"))
    folded.eval()
    assert (_logits(folded, ids) - fixed).abs().max() < 1e-4
    assert (learned - fixed).abs().max() > 1e-6  # the learned gate is not constant: the check can fail
