"""PPO stage on the tiny NF4 Llama: the properties DESIGN.md section 4 demands, checked with numbers.

One SFT + reward run directory is built per module (through the CLI, in-process) and every PPO
run links to it. The SFT and reward adapters are trained with lora_dropout=0.1 on purpose: if any
dropout were live during rollouts or PPO epochs, the exact-equality checks below would fail.
"""
import json
import math
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pipeline.artifacts.checkpoints import latest_checkpoint, load_state
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.models import forwards, loading, stacking
from pipeline.rl import ppo_math, rollout
from pipeline.stages import ppo

REPO = Path(__file__).resolve().parents[1]
# Logged numbers that measure time (model FLOPs per phase are not: they are compared).
TIMED = ("time/", "perf/mfu", "perf/tokens_per_s")
CONFIG = str(REPO / "configs" / "tiny.yaml")
REWARDS_MODULE = "rlhf_ppo_test_rewards"

QUESTIONS = ["What a lovely day to learn something new?", "Could you suggest a quick breakfast idea?",
             "How do I keep my plants healthy?", "Tell me a fun fact about the ocean.",
             "Is this terrible?", "Say something nice.", "What is the quick brown fox?", "Count to five."]
ANSWERS = ["Try oatmeal with fresh berries.", "Water them regularly.", "The ocean is great!",
           "Thank you so much!", "That sounds wonderful.", "I feel great today.",
           "The fox jumps over the lazy dog.", "1 2 3 4 5."]

# Rewards reached by dotted path (module written to a temp folder put on sys.path / PYTHONPATH).
REWARDS_SOURCE = textwrap.dedent('''
    import os
    from pathlib import Path

    STATE = {"calls": 0, "fail_at": None, "fail_kind": "error", "watch": None, "seen": []}


    def reset(fail_at=None, fail_kind="error", watch=None):
        STATE.update(calls=0, fail_at=fail_at, fail_kind=fail_kind, watch=watch, seen=[])


    def flaky(prompts, responses):
        """0.1 per character; fails on call number STATE['fail_at']."""
        STATE["calls"] += 1
        if STATE["watch"] is not None:
            run = Path(STATE["watch"])
            STATE["seen"].append(((run / "ppo").exists(), (run / "ppo.work").exists()))
        if STATE["calls"] == STATE["fail_at"]:
            if STATE["fail_kind"] == "interrupt":
                raise KeyboardInterrupt  # what a killed run looks like from inside the loop
            if STATE["fail_kind"] == "nan":
                return [1.0, float("nan")] + [1.0] * (len(responses) - 2)
            raise RuntimeError("flaky broke on purpose")
        return [0.1 * len(r) for r in responses]


    def chars(prompts, responses):
        return [float(len(r)) for r in responses]


    def rank_logged(prompts, responses):
        with open(os.environ["PPO_TEST_RANK_LOG"], "a") as f:
            f.write(os.environ.get("RANK", "?") + "\\n")
        return [float(len(r)) for r in responses]
''')


def _write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread for this module. On 2 shared cores, when another process holds a core, the
    OpenMP parallel regions of the NF4 CPU kernels wait on a descheduled thread: a 4-step tiny PPO run
    took ~26 s with 2 threads against ~1.2 s with 1 (another process busy on one core)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def rewards_mod(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rewards")
    (folder / f"{REWARDS_MODULE}.py").write_text(REWARDS_SOURCE)
    sys.path.insert(0, str(folder))
    import importlib

    mod = importlib.import_module(REWARDS_MODULE)
    yield mod
    sys.path.remove(str(folder))
    sys.modules.pop(REWARDS_MODULE, None)


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def precision(request):
    """Every PPO property below is checked in both compute precisions (auto picks bf16 on CPUs with
    AMX/AVX512-BF16, float32 elsewhere)."""
    return request.param


@pytest.fixture(scope="module")
def data_overrides(tmp_path_factory, precision):
    d = tmp_path_factory.mktemp("data")
    sft = _write_jsonl(d / "sft.jsonl", [{"messages": [{"role": "user", "content": q},
                                                       {"role": "assistant", "content": a}]}
                                         for q, a in zip(QUESTIONS, ANSWERS)])
    pairs = _write_jsonl(d / "pairs.jsonl", [{"prompt": q, "chosen": a, "rejected": "This is terrible and I am sad."}
                                             for q, a in zip(QUESTIONS, ANSWERS)])
    prompts = _write_jsonl(d / "prompts.jsonl", [{"prompt": q} for q in QUESTIONS])
    return [f"data.sft_train={sft}", f"data.sft_eval={sft}", f"data.pairs_train={pairs}",
            f"data.pairs_eval={pairs}", f"data.prompts_train={prompts}", f"model.compute_dtype={precision}"]


def _cli(stage, run, overrides, flags=()):
    return CliRunner().invoke(main, [stage, "--config", CONFIG, "--run-dir", str(run), *flags, *overrides])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_overrides):
    """RUN/sft and RUN/reward, trained once, both with lora_dropout=0.1."""
    run = tmp_path_factory.mktemp("trained")
    for stage in ("sft", "reward"):
        r = _cli(stage, run, [*data_overrides, f"{stage}.lora.dropout=0.1"])
        assert r.exit_code == 0, r.output
    assert json.loads((run / "sft" / "adapter_config.json").read_text())["lora_dropout"] == 0.1
    return run


@pytest.fixture
def new_run(tmp_path, trained):
    """A fresh run directory whose sft/ and reward/ are the module's trained stages."""
    counter = iter(range(100))

    def make() -> Path:
        run = tmp_path / f"run{next(counter)}"
        run.mkdir()
        (run / "sft").symlink_to(trained / "sft", target_is_directory=True)
        (run / "reward").symlink_to(trained / "reward", target_is_directory=True)
        return run

    return make


def _ppo(run, data_overrides, *overrides, flags=()):
    return _cli("ppo", run, [*data_overrides, *overrides], flags)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().split("\n") if line.strip()]


def _reward_spec(*extra: str) -> str:
    base = "{name: reward_model, args: {path: '{run_dir}/reward'}, normalize: {kind: running}}"
    return "ppo.rewards=[" + ", ".join([base, *extra]) + "]"


RESUME_OVERRIDES = (_reward_spec(f"{{name: '{REWARDS_MODULE}:flaky', weight: 0.5}}"),
                    "ppo.steps=4", "ppo.save_every=2")
# tiny.yaml samples 4 episodes per step: the critic-free estimators take 2 prompts x 2 responses.
ALGORITHMS = {"ppo": (), "rloo": ("ppo.algorithm=rloo", "ppo.samples_per_prompt=2"),
              "grpo": ("ppo.algorithm=grpo", "ppo.samples_per_prompt=2"),
              # the policy's LoRA on the top layer only: the layer below runs once per step (shared trunk)
              "ppo+trunk": ("ppo.lora.top_layers=1",)}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, trained, data_overrides, rewards_mod):
    """Uninterrupted reference run per algorithm, made on first use: 4 steps, checkpoints every 2, learned
    reward (running-normalised) + flaky."""
    runs: dict[str, Path] = {}

    def get(algorithm: str) -> Path:
        if algorithm not in runs:
            run = tmp_path_factory.mktemp(f"reference_{algorithm}")
            for stage in ("sft", "reward"):
                (run / stage).symlink_to(trained / stage, target_is_directory=True)
            rewards_mod.reset()
            r = _ppo(run, data_overrides, *RESUME_OVERRIDES, *ALGORITHMS[algorithm])
            assert r.exit_code == 0, r.output
            runs[algorithm] = run
        return runs[algorithm]

    return get


@pytest.fixture(scope="module")
def run_a(reference_run):
    return reference_run("ppo")


# ---------------------------------------------------------------------------------------------
# The stacked model, built the way run_ppo builds it


@pytest.fixture(scope="module")
def stack(trained, precision):
    cfg = load_config(CONFIG, [f"model.compute_dtype={precision}"])
    base_model, tok, _ = loading.load_base(cfg.model)
    peft_model = stacking.stack_adapters(base_model, {ppo.SFT: trained / "sft"}, trainable=ppo.POLICY,
                                       new_adapter=(ppo.POLICY, loading.lora_config(cfg.ppo.lora)))
    policy = [ppo.SFT, ppo.POLICY]
    stacking.set_active_adapters(peft_model, policy)
    pv = ppo.PolicyValue(peft_model, base_model.config.hidden_size, policy, None)
    peft_model.eval()
    prompts = [[{"role": "user", "content": q}] for q in QUESTIONS[:4]]
    encoded = rollout.encode_prompts(tok, prompts, cfg.ppo.max_prompt_length)
    query, query_mask = forwards.left_pad(encoded, tok.pad_token_id)
    torch.manual_seed(0)
    stop = rollout.stop_token_ids(tok, base_model)
    with stacking.active_adapters(peft_model, policy):
        response, mask, ended = rollout.generate(peft_model, tok, query, query_mask, 8, cfg.ppo.temperature, stop)
    return dict(cfg=cfg, tok=tok, peft=peft_model, pv=pv, policy=policy, encoded=encoded, query=query,
                query_mask=query_mask, response=response, mask=mask, T=cfg.ppo.temperature)


def _fresh_sft_model(cfg, sft_dir):
    from peft import PeftModel

    base_model, _, _ = loading.load_base(cfg.model)
    return PeftModel.from_pretrained(base_model, str(sft_dir)).eval()


# 1. KL is exactly zero before the first update ------------------------------------------------

def test_kl_is_exactly_zero_before_the_first_update_k1_and_k3(stack):
    s = stack
    maskf = s["mask"].float()
    assert maskf.sum() > 0
    with torch.no_grad():
        logprobs, _, _ = s["pv"](s["query"], s["query_mask"], s["response"], s["mask"], s["T"])
        with stacking.active_adapters(s["peft"], [ppo.SFT]):  # reference: sft
            ref = forwards.forward_response(s["peft"], s["query"], s["query_mask"], s["response"], s["mask"],
                                           s["T"]).logprobs
        with stacking.active_adapters(s["peft"], None):  # the bare base, for contrast
            base_lp = forwards.forward_response(s["peft"], s["query"], s["query_mask"], s["response"], s["mask"],
                                               s["T"]).logprobs
    for estimator in ("k1", "k3"):
        kl = ppo_math.kl_per_token(logprobs, ref, estimator) * maskf
        assert torch.equal(kl, torch.zeros_like(kl)), (estimator, kl.abs().max())
    # The check has teeth: the trained SFT adapter (part of the policy) moves the logprobs off the base.
    assert ((logprobs - base_lp) * maskf).abs().max() > 1e-4


def test_first_logged_step_has_zero_kl(run_a):
    row = _rows(run_a / "ppo" / "metrics.jsonl")[0]  # k1 (default), reference: sft
    assert row["step"] == 1 and row["ppo/kl"] == 0.0 and row["ppo/non_score_reward"] == 0.0
    assert row["ppo/rlhf_reward"] == row["ppo/score"]


@pytest.mark.parametrize("overrides", [("ppo.kl_estimator=k3",),
                                       ("ppo.value_model=adapter",),
                                       ("ppo.sft_adapter=", "ppo.reference=base"),
                                       ("ppo.micro_batch_size=1",),
                                       ("ppo.rollout_weights=adapters",),
                                       ALGORITHMS["rloo"],
                                       (*ALGORITHMS["rloo"], "ppo.kl_in=loss", "ppo.micro_batch_size=1"),
                                       ALGORITHMS["grpo"],
                                       (*ALGORITHMS["grpo"], "ppo.samples_per_prompt=4", "ppo.kl_in=reward",
                                        "ppo.grpo_scale_std=false")],
                         ids=["k3", "value-adapter", "no-sft-reference-base", "micro-batches",
                              "rollout-through-adapters", "rloo", "rloo-kl-loss-micro-batches", "grpo-k3-loss",
                              "dr-grpo-k4-kl-reward"])
def test_first_step_invariants_in_other_settings(overrides, new_run, data_overrides):
    """KL == 0 and ratio == 1 at step 1 also with k3, with a value adapter (its forward switches
    adapters inside PolicyValue.forward), with a fresh policy on the bare base, with micro-batches (old
    logprobs from a separate no-grad forward), sampling through the adapters, and for the critic-free
    estimators with the KL in the reward or in the loss; in both precisions."""
    run = new_run()
    r = _ppo(run, data_overrides, *overrides, "ppo.steps=1", "ppo.ppo_epochs=2")
    assert r.exit_code == 0, r.output
    row = _rows(run / "ppo" / "metrics.jsonl")[0]
    assert row["ppo/kl"] == 0.0 and row["ppo/non_score_reward"] == 0.0
    assert row["ppo/rlhf_reward"] == row["ppo/score"]
    assert (row["ppo/first_ratio"], row["ppo/first_clipfrac"], row["ppo/first_approx_kl"]) == (1.0, 0.0, 0.0)


# 2. Reference logits ----------------------------------------------------------------------------

def test_reference_sft_equals_sft_model_loaded_alone(stack, trained):
    s = stack
    ids = torch.cat([s["query"], s["response"]], dim=1)
    attn = torch.cat([s["query_mask"], s["mask"].long()], dim=1)
    sft_alone = _fresh_sft_model(s["cfg"], trained / "sft")
    with torch.no_grad():
        with stacking.active_adapters(s["peft"], [ppo.SFT]):
            ref_logits = s["peft"](input_ids=ids, attention_mask=attn).logits
            ref_lp = forwards.forward_response(s["peft"], s["query"], s["query_mask"], s["response"], s["mask"],
                                              s["T"]).logprobs
        want_logits = sft_alone(input_ids=ids, attention_mask=attn).logits
        want_lp = forwards.forward_response(sft_alone, s["query"], s["query_mask"], s["response"], s["mask"],
                                           s["T"]).logprobs
    assert (ref_logits - want_logits).abs().max() <= 1e-6
    assert (ref_lp - want_lp).abs().max() <= 1e-6
    # and the policy adapter was restored afterwards
    assert list(s["peft"].base_model.active_adapters) == s["policy"]


def test_reference_base_equals_freshly_loaded_base(stack):
    s = stack
    ids = torch.cat([s["query"], s["response"]], dim=1)
    attn = torch.cat([s["query_mask"], s["mask"].long()], dim=1)
    fresh, _, _ = loading.load_base(s["cfg"].model)
    fresh.eval()
    with torch.no_grad():
        with stacking.active_adapters(s["peft"], None):
            ref_logits = s["peft"](input_ids=ids, attention_mask=attn).logits
            ref_lp = forwards.forward_response(s["peft"], s["query"], s["query_mask"], s["response"], s["mask"],
                                              s["T"]).logprobs
        want_logits = fresh(input_ids=ids, attention_mask=attn).logits
        want_lp = forwards.forward_response(fresh, s["query"], s["query_mask"], s["response"], s["mask"],
                                           s["T"]).logprobs
        sft_logits = s["peft"](input_ids=ids, attention_mask=attn).logits  # policy adapters back on
    assert (ref_logits - want_logits).abs().max() <= 1e-6
    assert (ref_lp - want_lp).abs().max() <= 1e-6
    assert (sft_logits - want_logits).abs().max() > 1e-4


# 3. Left padding ----------------------------------------------------------------------------------

def test_left_padding_does_not_change_logprobs(stack):
    s = stack
    pad, eos = s["tok"].pad_token_id, s["tok"].eos_token_id
    # Row 0 as sampled; row 1 with a stop token at position 3, so pad follows it in the response.
    early = s["response"][1:2].clone()
    early[0, 3] = eos
    early, early_mask, ended = ppo_math.first_stop_truncate(early, [eos], pad)
    assert ended.all() and early_mask.sum() == 4 and (early[0, 4:] == pad).all()
    cases = [(s["encoded"][0], s["response"][0:1], s["mask"][0:1]), (s["encoded"][1], early, early_mask)]
    for prompt, resp, mask in cases:
        outs = []
        for extra in (0, 5):
            q = torch.tensor([[pad] * extra + prompt])
            qm = torch.tensor([[0] * extra + [1] * len(prompt)])
            with torch.no_grad():
                outs.append(forwards.forward_response(s["peft"], q, qm, resp, mask, s["T"], with_entropy=True,
                                                     with_hidden=True))
        m = mask.float()
        assert ((outs[0].logprobs - outs[1].logprobs) * m).abs().max() <= 1e-5
        assert ((outs[0].entropy - outs[1].entropy) * m).abs().max() <= 1e-5
        assert ((outs[0].hidden - outs[1].hidden) * m.unsqueeze(-1)).abs().max() <= 1e-5
    # Inside a batch, a row padded to the longest prompt scores like the row alone.
    with torch.no_grad():
        batch = forwards.forward_response(s["peft"], s["query"], s["query_mask"], s["response"], s["mask"], s["T"])
        for row in range(s["query"].shape[0]):
            alone = forwards.forward_response(s["peft"], torch.tensor([s["encoded"][row]]),
                                             torch.ones(1, len(s["encoded"][row]), dtype=torch.long),
                                             s["response"][row:row + 1], s["mask"][row:row + 1], s["T"])
            m = s["mask"][row].float()
            assert ((batch.logprobs[row] - alone.logprobs[0]) * m).abs().max() <= 1e-5


# 4. No dropout ------------------------------------------------------------------------------------

def _live_dropouts(module) -> list[str]:
    return [n for n, m in module.named_modules() if isinstance(m, torch.nn.Dropout) and m.training and m.p > 0]


def test_policy_value_forward_is_deterministic_in_ppo_mode(monkeypatch, new_run, data_overrides):
    """Two forwards of the PolicyValue that run_ppo trained, in the mode its loop leaves it, agree
    exactly; the SFT adapter was trained with lora_dropout=0.1 and the policy adapter has 0.1 too."""
    captured: dict = {"pv": None, "live": [], "calls": 0}

    class Recording(ppo.PolicyValue):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            captured["pv"] = self

        def forward(self, *args, **kwargs):
            captured["calls"] += 1
            captured["live"].extend(_live_dropouts(self))
            captured["args"] = (args, kwargs)
            return super().forward(*args, **kwargs)

    monkeypatch.setattr(ppo, "PolicyValue", Recording)
    run = new_run()
    r = _ppo(run, data_overrides, "ppo.lora.dropout=0.1", "ppo.steps=1")
    assert r.exit_code == 0, r.output
    pv = captured["pv"]
    # tiny.yaml runs 2 PPO epochs; with one minibatch the first epoch's forward also gives the old logprobs.
    assert captured["calls"] >= 2 and captured["live"] == []
    dropouts = [n for n, m in pv.named_modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    assert any(".sft" in n for n in dropouts) and any(".policy" in n for n in dropouts)
    args, kwargs = captured["args"]
    first = pv(*args, **kwargs)  # grad enabled, as in the PPO epochs
    second = pv(*args, **kwargs)
    for a, b in zip(first, second):
        assert a is None and b is None or torch.equal(a, b)
    # Control: the same forwards in train mode do differ, so the check above can fail.
    pv.peft_model.train()
    try:
        assert not torch.equal(pv(*args, **kwargs)[0], pv(*args, **kwargs)[0])
    finally:
        pv.peft_model.eval()


# 5. First minibatch -------------------------------------------------------------------------------

def test_first_minibatch_ratio_is_one(run_a):
    row = _rows(run_a / "ppo" / "metrics.jsonl")[0]
    assert row["step"] == 1
    assert row["ppo/first_ratio"] == 1.0
    assert row["ppo/first_clipfrac"] == 0.0
    assert row["ppo/first_approx_kl"] == 0.0


# 6. Missing-EOS penalty through run_ppo ---------------------------------------------------------

def test_missing_eos_penalty_lowers_the_logged_score(new_run, data_overrides, rewards_mod):
    run = new_run()
    r = _ppo(run, data_overrides, f"ppo.rewards=[{{name: '{REWARDS_MODULE}:chars'}}]",
             "ppo.missing_eos_penalty=-1.0", "ppo.max_new_tokens=2", "ppo.steps=1", "ppo.ppo_epochs=1")
    assert r.exit_code == 0, r.output
    row = _rows(run / "ppo" / "metrics.jsonl")[0]
    raw = row[f"ppo/score/{REWARDS_MODULE}:chars"]
    assert row["ppo/eos_fraction"] < 1.0 and raw > 0
    assert row["ppo/score"] == pytest.approx(raw - 1.0 * (1.0 - row["ppo/eos_fraction"]), abs=1e-5)


# 7. Resume ---------------------------------------------------------------------------------------

COMPARED = ("ppo/kl", "ppo/score", "ppo/policy_loss", "ppo/value_loss")


def test_same_seed_gives_the_same_run_whatever_the_global_rng(new_run, data_overrides):
    """ppo.seed alone decides the run: the fresh policy adapter's init must not depend on how much of
    the global RNG was used before run_ppo (in-process callers, a resumed run's reference)."""
    from safetensors.torch import load_file

    runs = []
    for entry_seed in (1, 2):
        torch.manual_seed(entry_seed)
        torch.rand(entry_seed)
        run = new_run()
        r = _ppo(run, data_overrides, "ppo.steps=1", "ppo.ppo_epochs=2")
        assert r.exit_code == 0, r.output
        runs.append(run)
    a, b = (_rows(run / "ppo" / "metrics.jsonl")[0] for run in runs)
    assert {k: v for k, v in a.items() if not k.startswith(TIMED)} == \
           {k: v for k, v in b.items() if not k.startswith(TIMED)}
    wa, wb = (load_file(str(run / "ppo" / "adapter_model.safetensors")) for run in runs)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("algorithm,kind", [("ppo", "error"), ("ppo", "interrupt"), ("rloo", "error"),
                                            ("grpo", "interrupt"), ("ppo+trunk", "interrupt")])
def test_resume_matches_an_uninterrupted_run(algorithm, kind, reference_run, new_run, data_overrides, rewards_mod):
    """'error': the reward raises at step 3, the run saves a checkpoint and stops with a message.
    'interrupt': the run dies at step 4 (KeyboardInterrupt, no chance to save): the latest regular
    checkpoint (step 2) is used and the metrics row it already logged for step 3 is dropped.
    The critic-free estimators resume through the same code, with no value parameters in the state."""
    run_a = reference_run(algorithm)
    run = new_run()
    fail_at = 3 if kind == "error" else 4
    rewards_mod.reset(fail_at=fail_at, fail_kind=kind, watch=run)
    overrides = (*RESUME_OVERRIDES, *ALGORITHMS[algorithm])
    r = _ppo(run, data_overrides, *overrides)
    assert r.exit_code != 0
    if kind == "error":
        # The CLI shows PPOError as one clean line (no traceback).
        msg = r.output
        assert "PPOError" in msg and "Traceback" not in msg, msg
        assert f"'{REWARDS_MODULE}:flaky'" in msg and "flaky broke on purpose" in msg
        ckpt = run / "ppo.work" / "checkpoints" / "step-000002"
        assert str(ckpt) in msg and "--resume" in msg
    # RUN/ppo appears only when the run completes; until then everything is in RUN/ppo.work
    assert rewards_mod.STATE["seen"] == [(False, True)] * fail_at
    assert not (run / "ppo").exists() and (run / "ppo.work" / "checkpoints" / "latest").is_file()
    assert (run / "ppo.work" / "checkpoints" / "latest").read_text() == "step-000002"

    rewards_mod.reset()
    r = _ppo(run, data_overrides, *overrides, flags=["--resume"])
    assert r.exit_code == 0, r.output
    want = _rows(run_a / "ppo" / "metrics.jsonl")
    got = _rows(run / "ppo" / "metrics.jsonl")
    assert [g["step"] for g in got] == [1, 2, 3, 4]
    # Bit-identical on CPU (one thread, same process): data position, RNG, optimizer, scheduler, KL
    # controller and reward normaliser all come back from the checkpoint.
    for w, g in zip(want[2:], got[2:]):
        assert g.keys() == w.keys() and ("ppo/value_loss" in w) == algorithm.startswith("ppo")
        for k in [k for k in COMPARED if k in w]:
            assert g[k] == w[k], (g["step"], k, g[k], w[k])
        for k in w:  # every other logged number too (timings aside)
            if not k.startswith(TIMED) and not (isinstance(w[k], float) and math.isnan(w[k])):
                assert g[k] == w[k], (g["step"], k, g[k], w[k])
    # and the final adapters are the same
    from safetensors.torch import load_file

    a = load_file(str(run_a / "ppo" / "adapter_model.safetensors"))
    b = load_file(str(run / "ppo" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if algorithm.startswith("ppo"):
        assert torch.equal(load_file(str(run_a / "ppo" / ppo.VALUE_HEAD_FILE))["weight"],
                           load_file(str(run / "ppo" / ppo.VALUE_HEAD_FILE))["weight"])
    else:
        assert not (run / "ppo" / ppo.VALUE_HEAD_FILE).exists()


def test_resume_refuses_a_checkpoint_of_another_algorithm(new_run, data_overrides, rewards_mod):
    run = new_run()
    rewards_mod.reset(fail_at=2)
    spec = f"ppo.rewards=[{{name: '{REWARDS_MODULE}:flaky'}}]"
    r = _ppo(run, data_overrides, spec, "ppo.steps=2", "ppo.ppo_epochs=1", *ALGORITHMS["rloo"])
    assert r.exit_code != 0
    rewards_mod.reset()
    r = _ppo(run, data_overrides, spec, "ppo.steps=2", "ppo.ppo_epochs=1", flags=["--resume"])
    assert r.exit_code != 0
    assert "was written with ppo.algorithm=rloo, ppo.samples_per_prompt=2; this config has ppo and 1" in r.output


@pytest.mark.parametrize("algorithm", ["rloo", "grpo"])
def test_critic_free_runs_create_and_save_no_value_model(algorithm, reference_run, data_overrides):
    """No value parameter is created, optimised, checkpointed or saved; the logs carry the group
    diagnostics instead of the value statistics; fuse takes the output like PPO's (eval: test_evaluate)."""
    from safetensors.torch import load_file

    run = reference_run(algorithm)
    out = run / "ppo"
    assert not (out / ppo.VALUE_HEAD_FILE).exists() and not (out / "value_adapter").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["algorithm"], manifest["samples_per_prompt"], manifest["value_model"]) == (algorithm, 2, None)
    assert manifest["metrics"]["algorithm"] == algorithm
    state = load_state(out / "checkpoints" / "step-000004")
    assert "value_head" not in state and state["algorithm"] == algorithm
    # Adam state for exactly the policy adapter's tensors (lora_A and lora_B of each adapted layer)
    assert len(state["optimizer"]["state"]) == len(load_file(str(out / "adapter_model.safetensors")))
    rows = _rows(out / "metrics.jsonl")
    for row in rows:
        assert not any(k.startswith(("ppo/value", "ppo/vf_", "ppo/explained")) for k in row), row.keys()
        assert 0.0 <= row["ppo/group/flat_fraction"] <= 1.0 and row["ppo/group/score_std"] >= 0.0
    assert rows[0]["ppo/kl"] == 0.0 and rows[-1]["ppo/kl"] != 0.0  # the policy moved
    r = _cli("fuse", run, [*data_overrides, "fuse.merged=false"])
    assert r.exit_code == 0, r.output


def test_critic_free_groups_are_k_samples_of_one_prompt_in_one_generate(monkeypatch, new_run, data_overrides):
    """Each step is ONE generate call whose rows are batch_size / k prompts, each repeated k times
    (row g*k + j = sample j of prompt g), and the estimator sees those groups: RLOO advantages of a
    group sum to 0."""
    calls, advantages = [], []
    real_sample, real_adv = rollout.sample, ppo_math.critic_free_advantages

    def recording_sample(model, tok, query, query_mask, *args, **kwargs):
        calls.append(query.clone())
        return real_sample(model, tok, query, query_mask, *args, **kwargs)

    def recording_adv(*args, **kwargs):
        out = real_adv(*args, **kwargs)
        advantages.append(out.detach().clone())
        return out

    monkeypatch.setattr(rollout, "sample", recording_sample)
    monkeypatch.setattr(ppo_math, "critic_free_advantages", recording_adv)
    run = new_run()
    r = _ppo(run, data_overrides, "ppo.steps=2", "ppo.ppo_epochs=1", "ppo.batch_size=6", "ppo.minibatches=2",
             "ppo.algorithm=rloo", "ppo.samples_per_prompt=3")
    assert r.exit_code == 0, r.output
    assert len(calls) == 2 and len(advantages) == 2  # one generate and one estimate per step
    for query in calls:
        assert query.shape[0] == 6
        assert torch.equal(query[0], query[1]) and torch.equal(query[0], query[2])
        assert torch.equal(query[3], query[4]) and torch.equal(query[3], query[5])
        assert not torch.equal(query[0], query[3])  # two different prompts
    for adv in advantages:
        seq = adv.sum(1) / (adv != 0).sum(1).clamp(min=1)  # the one advantage each row carries
        torch.testing.assert_close(seq.reshape(2, 3).sum(1), torch.zeros(2), atol=1e-5, rtol=0)


# 8. Bad input -----------------------------------------------------------------------------------

def test_empty_prompt_file_is_a_clear_error(new_run, data_overrides, tmp_path):
    empty = tmp_path / "empty_prompts.jsonl"
    empty.write_text("")
    run = new_run()
    r = _ppo(run, data_overrides, f"data.prompts_train={empty}")
    assert r.exit_code != 0
    assert str(empty) in r.output and "no rows" in r.output


def test_prompt_longer_than_max_prompt_length_is_a_clear_error(new_run, data_overrides):
    # data.long_rows=error (the default truncates from the left and reports the count)
    run = new_run()
    r = _ppo(run, data_overrides, "ppo.max_prompt_length=8", "data.long_rows=error")
    assert r.exit_code != 0
    msg = r.output.replace("\n", " ")
    assert "DataError" in msg and " row 1: " in msg and "longer than ppo.max_prompt_length=8 (PPO prompts" in msg, msg


def test_nan_reward_stops_with_a_resumable_checkpoint(new_run, data_overrides, rewards_mod):
    run = new_run()
    spec = f"ppo.rewards=[{{name: '{REWARDS_MODULE}:flaky'}}]"
    rewards_mod.reset(fail_at=2, fail_kind="nan")
    r = _ppo(run, data_overrides, spec, "ppo.steps=2", "ppo.save_every=0", "ppo.ppo_epochs=1")
    assert r.exit_code != 0
    msg = r.output.replace("\n", " ")
    assert f"reward '{REWARDS_MODULE}:flaky': row 1 returned nan" in msg, msg
    ckpt = latest_checkpoint(run, "ppo")
    assert ckpt is not None and ckpt.parent == run / "ppo.work" / "checkpoints" and str(ckpt) in msg
    assert load_state(ckpt)["step"] == 1
    assert not (run / "ppo").exists()
    rewards_mod.reset()
    r = _ppo(run, data_overrides, spec, "ppo.steps=2", "ppo.save_every=0", "ppo.ppo_epochs=1", flags=["--resume"])
    assert r.exit_code == 0, r.output
    assert [g["step"] for g in _rows(run / "ppo" / "metrics.jsonl")] == [1, 2]


def test_nan_loss_restores_and_saves_the_start_of_the_step(monkeypatch, new_run, data_overrides):
    """policy_loss turns NaN on the 2nd PPO epoch of step 2 (after one optimizer step inside that
    step): run_ppo must put back the parameters, optimizer and RNG of the start of step 2 and save them."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    seen: dict = {"pv": None, "loss_calls": 0, "rng": []}

    class Recording(ppo.PolicyValue):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            seen["pv"] = self

    def trainables():
        pv = seen["pv"]
        state = {f"policy/{k}": v.detach().clone()
                 for k, v in get_peft_model_state_dict(pv.peft_model, adapter_name=ppo.POLICY).items()}
        state.update({f"value_head/{k}": v.detach().clone() for k, v in pv.value_head.state_dict().items()})
        return state

    real_loss, real_sample = ppo_math.policy_loss, rollout.sample

    def nan_loss(*args, **kwargs):
        seen["loss_calls"] += 1
        loss, stats = real_loss(*args, **kwargs)
        if seen["loss_calls"] == 3:  # step 2, first minibatch: nothing updated yet in this step
            seen["start"] = trainables()
        if seen["loss_calls"] == 4:  # step 2, second epoch: one update done
            seen["mid"] = trainables()
            return loss * float("nan"), stats
        return loss, stats

    def recording_sample(*args, **kwargs):
        seen["rng"].append(torch.get_rng_state())
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(ppo, "PolicyValue", Recording)
    monkeypatch.setattr(ppo_math, "policy_loss", nan_loss)
    monkeypatch.setattr(rollout, "sample", recording_sample)
    run = new_run()
    cfg = load_config(CONFIG, [*data_overrides, "ppo.steps=3", "ppo.save_every=0", "ppo.ppo_epochs=2"])
    with pytest.raises(ppo.PPOError, match=r"step 2, PPO epoch 2: loss is nan") as info:
        ppo.run_ppo(cfg, run)
    ckpt = latest_checkpoint(run, "ppo")
    assert ckpt == run / "ppo.work" / "checkpoints" / "step-000001" and str(ckpt) in str(info.value)
    start, mid = seen["start"], seen["mid"]
    assert any(not torch.equal(start[k], mid[k]) for k in start)  # the restore has something to undo
    now = trainables()
    assert all(torch.equal(now[k], start[k]) for k in start)  # restored in memory
    saved = {f"policy/{k}": v for k, v in load_file(str(ckpt / "policy" / "adapter_model.safetensors")).items()}
    state = load_state(ckpt)
    saved.update({f"value_head/{k}": v for k, v in state["value_head"].items()})
    assert saved.keys() == start.keys()
    assert all(torch.equal(saved[k], start[k]) for k in start)  # and on disk
    assert state["step"] == 1
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {2}  # 2 updates in step 1
    assert torch.equal(state["rng_per_process"][0]["torch"], seen["rng"][1])  # RNG at the start of step 2
    assert not (run / "ppo").exists()


# 9. Two processes ----------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_cpu_run(new_run, data_overrides, rewards_mod, tmp_path):
    """`accelerate launch --cpu --num_processes 2` does not start two processes (accelerate 1.15 sends
    --cpu to its simple launcher, which needs an MPI hostfile for several CPU processes and otherwise
    runs the script once); `--multi_gpu` selects the torchrun launcher, and run_ppo's
    Accelerator(cpu=True) then sets up MULTI_CPU with gloo."""
    run = new_run()
    rank_log = tmp_path / "ranks.txt"
    env = dict(os.environ, PPO_TEST_RANK_LOG=str(rank_log), OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
               PYTHONPATH=os.pathsep.join([str(Path(rewards_mod.__file__).parent), str(REPO),
                                           os.environ.get("PYTHONPATH", "")]))
    port = _free_port()
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
           "-m", "pipeline.cli", "ppo", "--config", CONFIG, "--run-dir", str(run), *data_overrides,
           "model.device=cpu", "ppo.steps=2", "ppo.ppo_epochs=1", "ppo.save_every=1",
           f"ppo.rewards=[{{name: reward_model, args: {{path: '{{run_dir}}/reward'}}}}, "
           f"{{name: '{REWARDS_MODULE}:rank_logged', weight: 0.1}}]"]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert sorted(rank_log.read_text().split()) == ["0", "0", "1", "1"], out[-3000:]  # really 2 processes
    rows = _rows(run / "ppo" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["ppo/kl"] == 0.0 and rows[0]["ppo/first_ratio"] == 1.0
    assert all(math.isfinite(r["ppo/policy_loss"]) for r in rows)
    assert (run / "ppo" / "manifest.json").is_file() and not (run / "ppo.work").exists()
    print(f"two-process run: {time.time() - t0:.1f}s")


def test_monitor_is_logged_but_never_optimised(new_run, data_overrides):
    """ppo.monitor scores every rollout (ppo/monitor/<id>) and changes nothing else: same metrics and
    adapter as the same run without it."""
    from safetensors.torch import load_file

    runs = []
    for monitor in ("ppo.monitor=[]", "ppo.monitor=[{name: sentiment, id: gold}]"):
        run = new_run()
        r = _ppo(run, data_overrides, "ppo.steps=2", "ppo.ppo_epochs=2", monitor)
        assert r.exit_code == 0, r.output
        runs.append(run)
    plain, watched = (_rows(run / "ppo" / "metrics.jsonl") for run in runs)
    for a, b in zip(plain, watched):
        assert -1.0 <= b["ppo/monitor/gold"] <= 1.0 and "ppo/monitor/gold" not in a
        assert {k: v for k, v in a.items() if not k.startswith(TIMED)} == \
               {k: v for k, v in b.items() if not k.startswith((*TIMED, "ppo/monitor/"))}
    wa, wb = (load_file(str(run / "ppo" / "adapter_model.safetensors")) for run in runs)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# 10. Speed paths: micro-batches, temperature sampling -------------------------------------------

def test_micro_batches_give_the_same_update_as_the_whole_minibatch(new_run, data_overrides, precision):
    """Gradient accumulation over micro-batches weighted by token share == one masked mean over the
    minibatch: same metrics and (to float rounding) the same adapter after two steps."""
    from safetensors.torch import load_file

    # In bf16 the first update already differs in rounding, so the second rollout samples other tokens:
    # there the comparison is of one step.
    steps = 2 if precision == "float32" else 1
    runs = {}
    for micro in (0, 1, 3):
        run = new_run()
        r = _ppo(run, data_overrides, f"ppo.steps={steps}", "ppo.ppo_epochs=2", f"ppo.micro_batch_size={micro}")
        assert r.exit_code == 0, r.output
        runs[micro] = run
    # float32: the same sums in another order (KL is a difference of near-equal logprobs: abs 1e-5).
    # bf16: each micro-batch shape rounds its matmuls differently in bf16 (2^-8 relative per product).
    # Adam normalises each update to ~lr (1e-3 in tiny.yaml), so a weight whose gradient is near zero can
    # move either way under bf16 rounding, in each of the two updates taken: in bf16 the adapters agree to
    # two updates (measured: 1.3e-3 on 1 of 512 weights), the policy loss (~0.03, a mean of near-cancelling
    # terms) to 5e-3 (measured 1.7e-3 between micro-batch shapes; 3.8e-3 once several rows run their shared
    # prompt start as one 1-row pass, which bf16 rounds differently), with the reward head reward.seed draws.
    # float32 adapters: Adam divides by sqrt(v), so a weight whose gradient is near zero carries the sums'
    # reordering into its update (measured on a 2-core AMD EPYC, AVX512: 1.2e-6 on 1 of 256 weights after two
    # updates, relative 7e-4); 1e-5 is 1% of one update of ~lr.
    rel, abs_, w_atol = (1e-4, 1e-5, 1e-5) if precision == "float32" else (5e-2, 5e-3, 1e-3)
    ref_rows = _rows(runs[0] / "ppo" / "metrics.jsonl")
    ref_w = load_file(str(runs[0] / "ppo" / "adapter_model.safetensors"))
    moved = max((ref_w[k] - torch.zeros_like(ref_w[k])).abs().max().item() for k in ref_w if "lora_B" in k)
    assert moved > 1e-4  # the policy did change, so equal adapters mean equal updates
    for micro in (1, 3):
        rows = _rows(runs[micro] / "ppo" / "metrics.jsonl")
        for a, b in zip(ref_rows, rows):
            for k in ("ppo/kl", "ppo/score", "ppo/policy_loss", "ppo/value_loss", "ppo/ratio_mean", "ppo/clipfrac"):
                # clipfrac counts tokens past the clip range: in bf16 one at the boundary can fall either side
                # (measured: 0 vs 1/64, one token of the 64 seen over two PPO epochs).
                tol = 1 / 32 if k == "ppo/clipfrac" and precision == "bfloat16" else abs_
                assert b[k] == pytest.approx(a[k], rel=rel, abs=tol), (micro, a["step"], k)
        w = load_file(str(runs[micro] / "ppo" / "adapter_model.safetensors"))
        for k in ref_w:
            if precision == "float32":
                torch.testing.assert_close(w[k], ref_w[k], atol=w_atol, rtol=rel)
            else:
                # Each of the two Adam updates moves a weight by at most ~lr (w_atol) either way (|m/sqrt(v)|
                # <= 1.0014 at Adam's second step), so a weight whose gradient rounds across zero in both can
                # end at +2 lr in one run and -2 lr in the other (measured 2.5e-3 on 1 of 512 weights, after the
                # sampler's random stream changed); the typical weight agrees to a tenth of one update.
                diff = (w[k] - ref_w[k]).abs()
                assert diff.max().item() <= 4 * w_atol + 1e-4, k
                assert diff.median().item() <= w_atol / 10, k


def test_shared_trunk_gives_the_same_run_as_every_layer_each_pass(monkeypatch, new_run, data_overrides, precision):
    """With the policy's LoRA on the top layer only, the layer below runs once per step and the reference,
    old and training passes replay it (pipeline.models.trunk): the same metrics and adapter as the run in
    which every pass runs every layer, to float round-off (tolerances as in the micro-batch test above:
    bf16 rounds the two layouts' matmuls differently, so there one step is compared)."""
    from safetensors.torch import load_file

    from pipeline.models import trunk

    steps = 2 if precision == "float32" else 1
    runs, calls, served = {}, [], []
    real = trunk.response_forward
    monkeypatch.setattr(trunk, "response_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    real_served = trunk.sampled_shared_rows
    monkeypatch.setattr(trunk, "sampled_shared_rows", lambda *a, **k: served.append(real_served(*a, **k)) or served[-1])
    for share in (False, True):
        monkeypatch.setattr(trunk, "SHARE_TRUNK", share)
        run = new_run()
        r = _ppo(run, data_overrides, f"ppo.steps={steps}", "ppo.minibatches=2", "ppo.lora.top_layers=1")
        assert r.exit_code == 0, r.output
        assert ("shared trunk" in r.output) == share and bool(calls) == share
        runs[share] = run
    # in float32 every step's trunk was the sampler's (kept while sampling, not run again); in bf16 it ran
    assert len(served) == (steps if precision == "float32" else 0) and all(x is not None for x in served)
    rel, abs_, w_atol = (1e-4, 1e-5, 1e-5) if precision == "float32" else (5e-2, 5e-3, 1e-3)
    plain, shared = (_rows(runs[s] / "ppo" / "metrics.jsonl") for s in (False, True))
    assert plain[0]["ppo/kl"] == 0.0 and shared[0]["ppo/kl"] == 0.0
    for a, b in zip(plain, shared):
        for k in ("ppo/kl", "ppo/score", "ppo/policy_loss", "ppo/value_loss", "ppo/ratio_mean"):
            assert b[k] == pytest.approx(a[k], rel=rel, abs=abs_), (a["step"], k)
        # the trunk's forward is counted once per step: fewer model FLOPs for the same work
        assert b["perf/flops_train"] < a["perf/flops_train"]
    w_plain, w_shared = (load_file(str(runs[s] / "ppo" / "adapter_model.safetensors")) for s in (False, True))
    assert all(".layers.0." not in k for k in w_shared)  # the bottom layer holds no policy weight
    for k in w_plain:
        torch.testing.assert_close(w_shared[k], w_plain[k], atol=4 * w_atol, rtol=rel)


@pytest.mark.parametrize("overrides,rows", [(("ppo.micro_batch_size=1",), 1),
                                            (("ppo.minibatches=2",), 2),
                                            (("ppo.algorithm=grpo", "ppo.samples_per_prompt=2",
                                              "ppo.micro_batch_size=2"), 2)],
                         ids=["micro-1", "minibatch-2", "grpo-micro-2"])
def test_every_forward_of_a_step_sees_the_same_number_of_rows(monkeypatch, new_run, data_overrides, overrides, rows):
    """Reference, old and training logprobs all come from forwards over `micro` rows: in bf16 the same
    weights gave logprobs 0.063 apart per token between 32-row and 8-row batches on the embedded model,
    a k3 KL of 0.14 nats between the policy and its own reference before any update."""
    sizes = []
    real = forwards.forward_response

    def recording(model, query, *args, **kwargs):
        sizes.append(query.shape[0])
        return real(model, query, *args, **kwargs)

    monkeypatch.setattr(forwards, "forward_response", recording)
    r = _ppo(new_run(), data_overrides, "ppo.steps=1", "ppo.ppo_epochs=1", *overrides)
    assert r.exit_code == 0, r.output
    assert sizes and set(sizes) == {rows}, sizes


def test_temperature_sampler_samples_softmax_over_temperature():
    # logits (0, 1, 2, 3) at T = 0.5: softmax(0, 2, 4, 6) = e^(0,2,4,6) / (1 + 7.389 + 54.598 + 403.429)
    # = (0.00214, 0.01587, 0.11731, 0.86468)
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(40000, 1)
    torch.manual_seed(0)
    picks = rollout.TemperatureSampler(0.5)(None, logits).argmax(-1)
    freq = torch.bincount(picks, minlength=4).float() / picks.numel()
    expected = torch.tensor([0.00214, 0.01587, 0.11731, 0.86468])
    # binomial standard error at n=40000 is at most 0.0025; 0.006 is > 2.4 sigma for every entry
    assert (freq - expected).abs().max() < 0.006, freq
    # T = 2: softmax(0, 0.5, 1, 1.5) = (0.1015, 0.1674, 0.2760, 0.4551)
    sampler = rollout.TemperatureSampler(2.0, record=True)
    out = sampler(None, logits)
    picks = out.argmax(-1)
    freq = torch.bincount(picks, minlength=4).float() / picks.numel()
    assert (freq - torch.tensor([0.1015, 0.1674, 0.2760, 0.4551])).abs().max() < 0.01, freq
    # the output is 0 at the draw and -inf elsewhere; the kept logprob is log softmax(l / 2) at the draw:
    # Z = 1 + e^0.5 + e^1 + e^1.5 = 1 + 1.6487 + 2.7183 + 4.4817 = 9.8487, log Z = 2.2873, so the logprobs
    # are (0, 0.5, 1, 1.5) - 2.2873 = (-2.2873, -1.7873, -1.2873, -0.7873)
    assert torch.equal(out.gather(-1, picks[:, None]).squeeze(-1), torch.zeros(40000))
    assert torch.isinf(out).sum() == 3 * 40000
    want = torch.tensor([-2.2873, -1.7873, -1.2873, -0.7873])[picks]
    torch.testing.assert_close(sampler.logprobs, want[:, None], atol=1e-4, rtol=0)
    # a token of probability 0 (logit -inf) is never drawn, at any temperature
    masked = torch.tensor([[0.0, -math.inf, 0.0, -math.inf]]).repeat(10000, 1)
    assert set(rollout.TemperatureSampler(0.3)(None, masked).argmax(-1).tolist()) == {0, 2}


def test_inverse_cdf_by_hand_and_against_one_cumulative_sum():
    # w = (1, 0, 3, 4), blocks of 2: block sums (1, 7), cumulative (1, 8), total 8.
    # u = 0.5: target 4 -> block 1 (1 <= 4 < 8), remainder 3 of 7, inside cumulative (3, 7) -> offset 1: token 3
    # u = 0.1: target 0.8 -> block 0, inside cumulative (1, 1) -> offset 0: token 0
    # u = 0.2: target 1.6 -> block 1, remainder 0.6 of 7 -> offset 0 (0 <= 0.6 < 3): token 2 (token 1 has w 0)
    w = torch.tensor([[1.0, 0.0, 3.0, 4.0]]).repeat(3, 1)
    pick, total = rollout.inverse_cdf(w, torch.tensor([[0.5], [0.1], [0.2]], dtype=torch.float64), block=2)
    assert pick.squeeze(-1).tolist() == [3, 0, 2]
    assert total.squeeze(-1).tolist() == [8.0, 8.0, 8.0]
    # u at the top of [0, 1) with zero weight at the end (and a ragged last block): never an index of weight 0
    w = torch.tensor([[0.0, 2.0, 0.0, 0.0, 0.0]])
    for block in (1, 2, 3, 4, 8):
        pick, _ = rollout.inverse_cdf(w, torch.tensor([[1.0 - 1e-16]], dtype=torch.float64), block=block)
        assert pick.item() == 1, block
    # any block size draws what the first index past u x total on one float64 cumulative sum draws
    g = torch.Generator().manual_seed(0)
    for v in (5, 256, 1000, 49152):
        w = torch.randn(64, v, generator=g).mul(3).exp()
        w[w < 0.05] = 0.0
        u = torch.rand(64, 1, generator=g, dtype=torch.float64)
        cdf = w.double().cumsum(-1)
        want = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
        for block in (7, 256):
            pick, total = rollout.inverse_cdf(w, u, block=block)
            assert torch.equal(pick, want), (v, block)
            torch.testing.assert_close(total, cdf[:, -1:], rtol=1e-6, atol=0)


def test_temperature_sampler_keeps_one_buffer_and_leaves_scores_alone():
    scores = torch.tensor([[0.0, 1.0, 2.0]])
    sampler = rollout.TemperatureSampler(1.0)
    first = sampler(None, scores)
    second = sampler(None, scores)
    assert first.data_ptr() == second.data_ptr()  # no fresh (rows x vocabulary) tensor per decode step
    assert torch.equal(scores, torch.tensor([[0.0, 1.0, 2.0]]))


def test_generate_samples_the_models_distribution(stack):
    """First sampled token over many rows vs the model's own softmax(logits / T) for that prompt."""
    s = stack
    n = 3000
    q, qm = s["query"][:1].repeat(n, 1), s["query_mask"][:1].repeat(n, 1)
    with torch.no_grad(), stacking.active_adapters(s["peft"], s["policy"]), loading.compute_context(s["peft"]):
        logits = s["peft"](input_ids=q[:1], attention_mask=qm[:1],
                           position_ids=(qm[:1].cumsum(1) - 1).clamp(min=0)).logits[0, -1]
        probs = torch.softmax(logits.float() / s["T"], -1)
        resp, _, _ = rollout.generate(s["peft"], s["tok"], q, qm, 1, s["T"], [-1], generator_seed=3)
    freq = torch.bincount(resp[:, 0], minlength=probs.numel()).float() / n
    top = probs.topk(5).indices
    # standard error sqrt(p(1-p)/3000) <= 0.0092
    assert (freq[top] - probs[top]).abs().max() < 0.03, (freq[top], probs[top])
    # Total variation over the whole vocabulary, against what n exact draws from probs show: with ~125
    # tokens above 1e-3, sampling alone gives TV ~0.088 (sd 0.005 over draws), so a fixed bound of 0.1
    # passed or failed with the trained adapter's luck. A temperature off by 20% moves the true TV by
    # 0.11; bf16 logits of a 3000-row forward round differently from the 1-row one (~0.02 measured).
    tv = (freq - probs).abs().sum() / 2
    g = torch.Generator().manual_seed(0)
    null = torch.stack([(torch.bincount(torch.multinomial(probs, n, replacement=True, generator=g),
                                        minlength=probs.numel()).float() / n - probs).abs().sum() / 2
                        for _ in range(20)])
    assert tv - null.mean() < 0.04, (tv, null.mean())
