"""Configuration: defaults <- YAML <- overrides; errors name the key."""
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import ConfigError, PipelineConfig, load_config, save_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_yaml_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, PipelineConfig)


def test_precedence_defaults_yaml_overrides(tmp_path):
    yml = tmp_path / "c.yaml"
    yml.write_text("sft:\n  learning_rate: 0.001\n  lora: {r: 4}\nppo:\n  kl_coef: 0.2\n")
    cfg = load_config(yml, ["ppo.kl_coef=0.3", "sft.lora.alpha=7", "ppo.missing_eos_penalty=-1"])
    assert cfg.sft.learning_rate == 0.001      # YAML over default 2e-4
    assert cfg.sft.lora.r == 4                 # YAML
    assert cfg.sft.lora.alpha == 7             # override over default 32
    assert cfg.ppo.kl_coef == 0.3              # override over YAML 0.2
    assert cfg.ppo.missing_eos_penalty == -1.0
    assert cfg.reward.learning_rate == 1e-4    # untouched default


@pytest.mark.parametrize("override,message", [
    ("ppo.kl_coeff=0.1", "unknown key 'ppo.kl_coeff'; valid keys in 'ppo': lora, rewards"),
    ("sft.batch_size=eight", "sft.batch_size: expected int, got 'eight'"),
    ("sft.batch_size=2.5", "sft.batch_size: expected int, got 2.5"),
    ("nosuch.key=1", "unknown key 'nosuch'"),
    ("ppo.reference=policy", "ppo.reference: 'policy' is not one of sft, base"),
    ("sft.lora=3", "sft.lora: expected a section"),
    ("justtext", "not of the form section.key=value"),
    ("ppo.micro_batch_size=-1", "ppo.micro_batch_size must be >= 0"),
    ("ppo.rollout_weights=dense", "ppo.rollout_weights: 'dense' is not one of auto, merged, adapters"),
    ("model.attn_implementation=fast", "model.attn_implementation: 'fast' is not one of auto, eager, sdpa"),
    ("sft.lora.r=0", "sft.lora.r must be >= 1, got 0"),
    ("reward.lora.top_layers=-2", "reward.lora.top_layers must be >= 0"),
    ("ppo.lora.dropout=1.5", "ppo.lora.dropout must be in [0, 1)"),
    ("reward.gold_min_gap=3", "reward.gold_min_gap must be in [0, 2]"),
    ("ppo.monitor=[{name: sentiment, normalize: {kind: running}}]", "ppo.monitor[0]: monitors are logged raw"),
    ("ppo.algorithm=dpo", "ppo.algorithm: 'dpo' is not one of ppo, rloo, grpo"),
    ("ppo.algorithm=rloo", "ppo.samples_per_prompt must be >= 2 for ppo.algorithm=rloo"),
    ("ppo.samples_per_prompt=0", "ppo.samples_per_prompt must be >= 1, got 0"),
    ("ppo.samples_per_prompt=3", "ppo.batch_size (8) must be a multiple of ppo.samples_per_prompt (3)"),
    ("ppo.grpo_scale_std=false", "ppo.grpo_scale_std=false applies to ppo.algorithm=grpo only (this is ppo)"),
    ("ppo.kl_in=both", "ppo.kl_in: 'both' is not one of auto, reward, loss"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_algorithm_settings_resolve_and_refuse_what_has_no_meaning():
    # auto KL: PPO's behaviour is unchanged (k1 in the reward), GRPO gets DeepSeekMath's k3 loss term
    assert (load_config(None).ppo.kl_estimator, load_config(None).ppo.kl_in) == ("k1", "reward")
    rloo = load_config(None, ["ppo.algorithm=rloo", "ppo.samples_per_prompt=2"]).ppo
    assert (rloo.kl_estimator, rloo.kl_in) == ("k1", "reward")
    grpo = load_config(None, ["ppo.algorithm=grpo", "ppo.samples_per_prompt=4"]).ppo
    assert (grpo.kl_estimator, grpo.kl_in, grpo.grpo_scale_std) == ("k3", "loss", True)
    # an explicit choice wins over auto
    grpo = load_config(None, ["ppo.algorithm=grpo", "ppo.samples_per_prompt=4", "ppo.kl_in=reward",
                              "ppo.kl_estimator=k1", "ppo.grpo_scale_std=false"]).ppo
    assert (grpo.kl_estimator, grpo.kl_in, grpo.grpo_scale_std) == ("k1", "reward", False)
    # PPO may sample several responses per prompt too (independent episodes)
    assert load_config(None, ["ppo.samples_per_prompt=2"]).ppo.samples_per_prompt == 2
    with pytest.raises(ConfigError, match="ppo.value_model=adapter: ppo.algorithm=grpo trains no value model"):
        load_config(None, ["ppo.algorithm=grpo", "ppo.samples_per_prompt=2", "ppo.value_model=adapter"])
    with pytest.raises(ConfigError, match="ppo.whiten_rewards applies to ppo.algorithm=ppo"):
        load_config(None, ["ppo.algorithm=rloo", "ppo.samples_per_prompt=2", "ppo.whiten_rewards=true"])


def test_shipped_rloo_and_grpo_configs_spend_the_default_episode_budget():
    default = load_config(REPO / "configs" / "default.yaml").ppo
    for name, kl in (("rloo", ("k1", "reward")), ("grpo", ("k3", "loss"))):
        pc = load_config(REPO / "configs" / f"{name}.yaml").ppo
        assert pc.algorithm == name and pc.samples_per_prompt == 4
        assert pc.steps * pc.batch_size == default.steps * default.batch_size == 20 * 32
        assert (pc.kl_estimator, pc.kl_in) == kl
        # everything else is the default run's, so the curves differ by the estimator alone
        assert pc.learning_rate == default.learning_rate and pc.kl_coef == default.kl_coef
    assert load_config(REPO / "configs" / "compare.yaml").eval.runs == ["runs/ppo", "runs/rloo", "runs/grpo"]
@pytest.mark.parametrize("override,message", [
    ("ppo.temperature=0", "ppo.temperature must be > 0, got 0.0"),
    ("ppo.gamma=1.5", "ppo.gamma must be in [0, 1], got 1.5"),
    ("ppo.kl_coef=-0.1", "ppo.kl_coef must be >= 0, got -0.1"),
    ("ppo.kl_coef=.nan", "ppo.kl_coef must be a finite number, got nan"),
    ("sft.learning_rate=.inf", "sft.learning_rate must be a finite number, got inf"),
    ("sft.max_steps=0", "sft.max_steps must be -1 (run epochs) or >= 1, got 0"),
    ("reward.save_steps=-5", "reward.save_steps must be >= 0 (0 = no checkpoints), got -5"),
    ("sft.keep_checkpoints=0", "sft.keep_checkpoints must be >= 1, got 0"),
    ("sft.seed=-1", "sft.seed must be in [0, 4294967295], got -1"),
    ("sft.lr_scheduler=warm", "sft.lr_scheduler: 'warm' is not one of linear, cosine"),
    ("sft.lora.bias=some", "sft.lora.bias: 'some' is not one of none, all, lora_only"),
    ("sft.lora.target_modules=[]", "sft.lora.target_modules must be 'all-linear' or a non-empty list"),
    ("model.device=gpu", "model.device: 'gpu' is not one of auto, cpu, cuda, cuda:N, mps or xpu"),
    ("eval.best_of_n=[1, 0]", "eval.best_of_n[1] must be >= 1, got 0"),
    ("fuse.density=0", "fuse.density must be in (0, 1], got 0.0"),
    ("fuse.weights=[1]", "fuse.weights has 1 values for 2 adapters"),
    ("fuse.method=average", "fuse.method: 'average' is not one of cat, linear"),
    ("ppo.rewards=[]", "ppo.rewards is empty"),
    ("ppo.rewards=[{weight: 2}]", "ppo.rewards[0]: a reward spec is a name or a mapping with a 'name'"),
    ("eval.gold=[{name: sentiment, weight: .nan}]", "eval.gold[0].weight must be a finite number"),
    ("ppo.batch_size=6", "ppo.batch_size (6) must be divisible by ppo.minibatches"),
])
def test_out_of_range_values_name_key_value_and_range(override, message):
    overrides = [override, "ppo.minibatches=4"] if "divisible" in message else [override]
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


def test_every_number_and_choice_has_a_valid_range():
    """A key added without a range would accept any value: every int and float key needs a rule."""
    from pipeline.config import RULES, _leaves

    numeric = [k for k, v in _leaves(PipelineConfig()) if isinstance(v, (int, float)) and not isinstance(v, bool)]
    assert [k for k in numeric if k not in RULES] == []
    assert not set(RULES) - {k for k, _ in _leaves(PipelineConfig())}  # no rule for a key that is gone
    for key, value in _leaves(PipelineConfig()):  # the defaults themselves are valid
        if key in RULES and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            assert RULES[key].ok(value), key


def test_scientific_notation_without_a_dot_is_a_float(tmp_path):
    # YAML 1.1 reads 1e-4 as a string; "1e-4" is what people type for a learning rate.
    yml = tmp_path / "c.yaml"
    yml.write_text("sft:\n  learning_rate: 3e-4\n")
    cfg = load_config(yml, ["ppo.learning_rate=1e-4", "ppo.missing_eos_penalty=-2E-2"])
    assert cfg.sft.learning_rate == 3e-4 and cfg.ppo.learning_rate == 1e-4 and cfg.ppo.missing_eos_penalty == -0.02
    with pytest.raises(ConfigError, match="ppo.learning_rate: expected float, got 'fast'"):
        load_config(None, ["ppo.learning_rate=fast"])


def test_yaml_errors_name_the_file(tmp_path):
    yml = tmp_path / "bad.yaml"
    yml.write_text("sft:\n  lerning_rate: 1\n")
    with pytest.raises(ConfigError, match="bad.yaml: unknown key 'sft.lerning_rate'"):
        load_config(yml)


def test_extends_applies_the_parent_first_and_lists_replace_whole(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "ppo:\n  steps: 5\n  kl_coef: 0.2\n  lora: {r: 4, alpha: 8}\n  monitor: [{name: sentiment}]\n")
    (tmp_path / "sub").mkdir()
    child = tmp_path / "sub" / "child.yaml"
    child.write_text("extends: ../base.yaml\nppo:\n  kl_coef: 0.05\n  lora: {r: 2}\n  monitor: []\n")
    cfg = load_config(child, ["ppo.steps=9"])
    assert cfg.ppo.kl_coef == 0.05                          # child over parent 0.2
    assert (cfg.ppo.lora.r, cfg.ppo.lora.alpha) == (2, 8)   # sections merge key by key
    assert cfg.ppo.monitor == []                            # a list is replaced, not appended to
    assert cfg.ppo.steps == 9                               # override over parent 5


def test_extends_errors_name_the_files(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("extends: b.yaml\n")
    b.write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="'extends' forms a cycle"):
        load_config(a)
    a.write_text("extends: nope.yaml\n")
    with pytest.raises(ConfigError, match=r"config file not found: .*nope.yaml \(extended by .*a.yaml\)"):
        load_config(a)
    b.write_text("extends: a.yaml\nsft: {lerning_rate: 1}\n")
    a.write_text("ppo: {steps: 2}\n")
    with pytest.raises(ConfigError, match="b.yaml: unknown key 'sft.lerning_rate'"):
        load_config(b)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["ppo.steps=7", "sft.lora.target_modules=[q_proj, v_proj]"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg


def test_cli_reports_config_errors_without_traceback():
    r = CliRunner().invoke(main, ["sft", "--config", str(REPO / "configs/tiny.yaml"), "sft.nope=1"])
    assert r.exit_code != 0
    assert "unknown key 'sft.nope'" in r.output
    assert "Traceback" not in r.output


@pytest.mark.parametrize("command", ["sft", "reward", "ppo", "fuse", "eval", "score"])
def test_every_command_has_help(command):
    r = CliRunner().invoke(main, [command, "--help"])
    assert r.exit_code == 0
    assert "OVERRIDES" in r.output and "--config" in r.output
