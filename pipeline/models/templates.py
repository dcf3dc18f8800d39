"""Which chat template a tokenizer renders conversations with (``model.chat_template``).

Every stage turns conversations into ids with ``tokenizer.apply_chat_template``; a base model's tokenizer
often has no template (GPT-2, Pythia, OPT as downloaded), and SFT's assistant-only loss needs one whose
assistant turns sit inside ``{% generation %}`` markers (transformers' ``return_assistant_tokens_mask``,
which trl's ``assistant_only_loss`` uses). The choices:

- ``auto``: the tokenizer's own template if it has one, else :data:`PLAIN_TEMPLATE` (announced in one line);
- ``chatml``: :data:`CHATML_GENERIC` (``<|im_start|>role ... <|im_end|>``);
- anything else: a Jinja template, given inline or as the path of a file holding one.

BOS: ``apply_chat_template`` never adds special tokens itself, so the template decides. The built-in
templates start with ``bos_token`` exactly when the tokenizer adds one to plain text (Llama's does, GPT-2's
does not), so a conversation starts the way the model's pretraining text did, with one BOS, never two.
"""
from __future__ import annotations

from pathlib import Path

# A plain transcript: "User: ...", "Assistant: ...<eos>". The EOS after each assistant turn is what
# generation stops on (rollout.stop_token_ids); the assistant text and its EOS are the generation span.
PLAIN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}"
    "{{ message['role'] | capitalize + ': ' + message['content'] + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)

# ChatML without a default system prompt (pipeline.models.embedded.CHATML_TEMPLATE is SmolLM2's, with one).
CHATML_GENERIC = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

BOS_PREFIX = "{{ bos_token }}"


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front of plain text (``tokenizer("x")``)."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("x").input_ids
    return bos is not None and len(ids) > 0 and ids[0] == bos


def _source(value: str, name: str) -> str:
    path = Path(value).expanduser()
    if "{" not in value and len(value) < 4096:
        if not path.is_file():
            raise FileNotFoundError(f"model.chat_template={value!r}: no such file; give auto, chatml, a Jinja "
                                    f"template or the path of a file holding one (model {name})")
        return path.read_text()
    return value


def resolve_chat_template(tokenizer, setting: str, name: str) -> tuple[str, str]:
    """``(template, why)`` for ``model.chat_template=setting`` on ``tokenizer`` (model ``name``); ``why`` is one
    log line, empty when the tokenizer's own template is used."""
    own = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    if setting == "auto" and own:
        return own, ""
    bos = BOS_PREFIX if adds_bos(tokenizer) else ""
    if setting == "auto":
        return bos + PLAIN_TEMPLATE, (f"{name}: the tokenizer has no chat template; using the plain "
                                      "'User: ... / Assistant: ...<eos>' template (README, Bring your own model; "
                                      "set model.chat_template to choose another)")
    if setting == "chatml":
        return bos + CHATML_GENERIC, f"{name}: chat template chatml (model.chat_template)"
    return _source(setting, name), f"{name}: chat template from model.chat_template"


def apply(tokenizer, setting: str, name: str) -> None:
    """Set the tokenizer's chat template from ``model.chat_template``; prints one line when it is not the
    tokenizer's own, and one when the template has no generation markers (SFT then trains on the last
    assistant turn of each conversation only, as a prompt/completion pair)."""
    template, why = resolve_chat_template(tokenizer, setting, name)
    if why:
        print(f"[model] {why}", flush=True)
    tokenizer.chat_template = template
    if why and "{% generation %}" not in template:
        print(f"[model] {name}: the chat template has no {{% generation %}} markers, so SFT's loss covers only "
              "the last assistant turn of each conversation (README, Bring your own model)", flush=True)
