"""Bring your own model: every stage on a tiny random model of each decoder family (tests/families.py),
chat templates for base models, and hub ids from an offline Hugging Face cache."""
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from families import FAMILIES, build, tokenizer_for
from helpers import A, S, U

from pipeline.cli import main
from pipeline.models import templates

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "tiny.yaml")
# The tiny config, shorter: two steps of each training stage still check every per-family invariant.
FAST = ["sft.max_steps=2", "sft.gold_eval_prompts=2", "reward.max_steps=2", "ppo.steps=2", "ppo.ppo_epochs=1",
        "eval.prompts=2", "eval.best_of_n=[1,2]"]


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory, tiny_path):
    """Each family's tiny model, built once per session on first use."""
    root = tmp_path_factory.mktemp("families")
    built = {}

    def get(family):
        if family not in built:
            built[family] = str(build(family, root / family, tiny_path))
        return built[family]
    return get


def _invoke(*args):
    r = CliRunner().invoke(main, list(args))
    assert r.exit_code == 0, r.output
    return r.output


@pytest.fixture(scope="module")
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # as tests/test_stages.py: tiny models run faster on one thread
    yield
    torch.set_num_threads(old)


# "gpt2:unquantized": GPT-2's Conv1D layers stay Conv1D without 4-bit (bitsandbytes turns them into Linear4bit)
@pytest.mark.parametrize("family", [*FAMILIES, "gpt2:unquantized"])
def test_every_stage_on_each_family(family, family_dir, tmp_path, one_thread):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pipeline.config import ModelConfig
    from pipeline.models import loading

    family, _, variant = family.partition(":")
    path = family_dir(family)
    run = tmp_path / "run"
    four_bit = variant != "unquantized"
    common = ["--config", CONFIG, "--run-dir", str(run), f"model.name={path}", *FAST,
              f"model.load_in_4bit={str(four_bit).lower()}"]
    outputs = {stage: _invoke(stage, *common) for stage in ("sft", "reward", "ppo", "fuse", "eval")}
    for stage in ("sft", "reward", "ppo", "fused", "eval"):
        assert (run / stage / "manifest.json").is_file(), stage

    # PPO's reference is the SFT adapter with the policy's adapters off: at the first step they are equal.
    first = json.loads((run / "ppo" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["ppo/kl"] == 0.0 and first["ppo/first_ratio"] == 1.0
    assert "lean kernels on" in outputs["ppo"] and "plain path for" in outputs["ppo"]

    # cat fusion is the stacked adapters exactly (to float round-off), and so is the merged export
    metrics = json.loads((run / "fused" / "manifest.json").read_text())["metrics"]
    assert metrics["max_abs_logit_diff_vs_stacked"] < 1e-4
    assert metrics["merged_max_abs_logit_diff_vs_nf4_policy"] < 1e-3

    # the merged export is a plain transformers model: it reproduces the fused adapter on the dequantized base
    merged = AutoModelForCausalLM.from_pretrained(str(run / "fused" / "merged"), dtype=torch.float32).eval()
    if four_bit:
        base, _, _ = loading.load_dequantized_base(ModelConfig(name=path))
    else:
        base, _, _ = loading.load_base(ModelConfig(name=path, load_in_4bit=False, compute_dtype="float32",
                                                   device="cpu"))
    fused = PeftModel.from_pretrained(base, str(run / "fused" / "adapter")).eval()
    ids = torch.tensor([[5, 17, 42, 9, 100, 7]])
    with torch.no_grad():
        diff = (merged(input_ids=ids).logits - fused(input_ids=ids).logits).abs().max().item()
    assert diff < 1e-4


def test_top_layers_finds_each_familys_layers(family_dir):
    """reward.lora.top_layers=1 adapts only the last decoder layer, whatever the family calls its layers."""
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification

    from pipeline.config import LoraConfigSection
    from pipeline.models import loading

    expected = {"gpt2": "transformer.h", "gptneox": "gpt_neox.layers", "opt": "model.decoder.layers",
                "falcon": "transformer.h", "llama": "model.layers"}
    for family in ("llama", "gpt2", "gptneox", "opt", "phi3", "falcon"):
        model = AutoModelForSequenceClassification.from_pretrained(family_dir(family), num_labels=1)
        path, layers = loading.decoder_layers(model)
        assert len(layers) == 2 and path == expected.get(family, "model.layers")
        cfg = loading.lora_config(LoraConfigSection(r=2, alpha=4, top_layers=1), task_type="SEQ_CLS", model=model)
        peft_model = get_peft_model(model, cfg)
        adapted = {n.split(".lora_A")[0] for n, _ in peft_model.named_parameters() if ".lora_A." in n}
        assert adapted and all(f"{path}.1." in n for n in adapted), (family, sorted(adapted))


CONVERSATION = [S("Be brief."), U("Hi there"), A("Hello! How can I help?"), U("Tell me a fact."),
                A("The ocean is big.")]


@pytest.mark.parametrize("case, setting", [("chatml", "auto"), ("no-template-no-pad", "auto"),
                                           ("no-template-adds-bos", "auto"), ("no-template", "chatml"),
                                           ("no-template-adds-bos", "chatml")])
def test_template_masks_exactly_the_assistant_turns(case, setting, tiny_path):
    """The tokens SFT trains on (trl's assistant mask: apply_chat_template's return_assistant_tokens_mask) decode
    to exactly the assistant turns, each with the token that ends it; BOS appears once, first, or never."""
    tok = tokenizer_for(case, tiny_path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    templates.apply(tok, setting, case)
    out = tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    end = "<|im_end|>" if tok.chat_template.count("<|im_end|>") else tok.eos_token
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == f"Hello! How can I help?{end}The ocean is big.{end}"
    if case == "no-template-adds-bos":
        # the tokenizer adds BOS to plain text: the conversation starts with exactly one, as its text did
        assert [i for i, t in enumerate(ids) if t == tok.bos_token_id] == [0]
    elif case.startswith("no-template"):
        assert not tok.chat_template.startswith(templates.BOS_PREFIX)  # no BOS where the tokenizer adds none


def test_plain_template_is_announced_and_file_templates_load(tiny_path, tmp_path, capsys):
    tok = tokenizer_for("no-template", tiny_path)
    templates.apply(tok, "auto", "my-base")
    assert tok.chat_template.endswith(templates.PLAIN_TEMPLATE)
    assert "my-base: the tokenizer has no chat template" in capsys.readouterr().out
    own = tokenizer_for("chatml", tiny_path)
    before = own.chat_template
    templates.apply(own, "auto", "x")
    assert own.chat_template == before and capsys.readouterr().out == ""  # a tokenizer's own template is kept
    f = tmp_path / "t.jinja"
    f.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    templates.apply(own, str(f), "x")
    assert own.apply_chat_template([U("a"), A("b")], tokenize=False) == "ab"
    with pytest.raises(FileNotFoundError, match="model.chat_template"):
        templates.apply(own, str(tmp_path / "missing.jinja"), "x")


def _hub_cache(home: Path, repo_id: str, folder: str) -> None:
    """``folder``'s files in huggingface_hub's cache layout under ``home`` (HF_HOME)."""
    import shutil

    repo = home / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    snap = repo / "snapshots" / commit
    shutil.copytree(folder, snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def test_hub_id_loads_offline_from_the_cache_and_a_missing_one_says_what_to_do(tmp_path, tiny_path, monkeypatch):
    from huggingface_hub import constants

    from pipeline.config import ModelConfig
    from pipeline.models import loading
    from pipeline.models.embedded import ModelError

    _hub_cache(tmp_path / "hf", "tiny-org/tiny-llama", tiny_path)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the environment at import; these are what snapshot_download consults per call
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    model, tok, info = loading.load_base(ModelConfig(name="tiny-org/tiny-llama", load_in_4bit=False,
                                                     compute_dtype="float32", device="cpu"))
    assert Path(info.path).parent.parent.name == "models--tiny-org--tiny-llama"
    assert model.config.hidden_size == 64 and tok.chat_template
    with pytest.raises(ModelError, match=r"model.name=nobody/nothing: not in the Hugging Face cache .*hf download"):
        loading.load_base(ModelConfig(name="nobody/nothing"))
    r = CliRunner().invoke(main, ["sft", "--config", CONFIG, "--run-dir", str(tmp_path / "run"),
                                  "model.name=nobody/nothing"])
    assert r.exit_code != 0 and "internal error" not in r.output
    assert "ModelError: model.name=nobody/nothing" in r.output


@pytest.mark.parametrize("config_cls, says", [("T5Config", "has no causal-LM class"),
                                              ("BertConfig", "is an encoder or encoder-decoder"),
                                              ("BartConfig", "is an encoder or encoder-decoder")])
def test_a_model_that_is_not_a_decoder_stops_at_load_in_one_line(config_cls, says, tmp_path, tiny_path):
    import transformers
    from transformers import AutoTokenizer

    from pipeline.config import ModelConfig
    from pipeline.models import loading
    from pipeline.models.embedded import ModelError

    getattr(transformers, config_cls)().save_pretrained(tmp_path)  # the check reads only the config
    AutoTokenizer.from_pretrained(tiny_path).save_pretrained(tmp_path)
    for kind in ("causal", "seqcls"):
        with pytest.raises(ModelError, match=f"model.name={tmp_path}: .*{says}"):
            loading.load_base(ModelConfig(name=str(tmp_path)), kind=kind)
