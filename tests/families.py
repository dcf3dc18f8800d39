"""Tiny random models of each decoder family, built in-process like embedded:tiny-random-llama (hidden 64,
2 layers) and saved as transformers folders: what a user brings with ``model.name=<folder>``.

They share the tiny Llama's tokenizer, adjusted per case to cover what base models ship with: no chat
template (GPT-2, NeoX, OPT), no pad token (GPT-2), a tokenizer that adds BOS to plain text (OPT's does).
Tied and untied embeddings both occur (GPT-2, OPT, Gemma tie; the rest do not).
"""
from __future__ import annotations

from pathlib import Path

import torch

# family -> (config class, its own keyword arguments, tokenizer case)
FAMILIES: dict[str, tuple[str, dict, str]] = {
    "llama": ("LlamaConfig", {"intermediate_size": 128, "num_key_value_heads": 2}, "chatml"),
    "mistral": ("MistralConfig", {"intermediate_size": 128, "num_key_value_heads": 2}, "chatml"),
    "qwen2": ("Qwen2Config", {"intermediate_size": 128, "num_key_value_heads": 2}, "chatml"),
    "qwen3": ("Qwen3Config", {"intermediate_size": 128, "num_key_value_heads": 2, "head_dim": 16}, "chatml"),
    "gemma2": ("Gemma2Config", {"intermediate_size": 128, "num_key_value_heads": 2, "head_dim": 16}, "chatml"),
    "gemma3": ("Gemma3TextConfig", {"intermediate_size": 128, "num_key_value_heads": 2, "head_dim": 16}, "chatml"),
    "phi3": ("Phi3Config", {"intermediate_size": 128, "num_key_value_heads": 4}, "chatml"),
    "gpt2": ("GPT2Config", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 512}, "no-template-no-pad"),
    "gptneox": ("GPTNeoXConfig", {"intermediate_size": 128}, "no-template"),
    "opt": ("OPTConfig", {"ffn_dim": 128, "word_embed_proj_dim": 64}, "no-template-adds-bos"),
    "falcon": ("FalconConfig", {}, "chatml"),
    "olmo2": ("Olmo2Config", {"intermediate_size": 128, "num_key_value_heads": 2}, "chatml"),
    "stablelm": ("StableLmConfig", {"intermediate_size": 128, "num_key_value_heads": 2}, "chatml"),
}


def tokenizer_for(case: str, tiny_path: str):
    """The tiny Llama's tokenizer as a base model of ``case`` would ship it."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_path)
    if case.startswith("no-template"):
        tok.chat_template = None
    if case == "no-template-no-pad":
        tok.pad_token = None
    if case == "no-template-adds-bos":
        # OPT's tokenizer puts its BOS in front of every text; "<|endoftext|>" plays that BOS here.
        tok.bos_token = "<|endoftext|>"
        tok._tokenizer.post_processor = processors.TemplateProcessing(
            single="<|endoftext|> $A", pair="<|endoftext|> $A <|endoftext|> $B",
            special_tokens=[("<|endoftext|>", tok.convert_tokens_to_ids("<|endoftext|>"))])
    return tok


def build(family: str, out: Path, tiny_path: str) -> Path:
    """Save a tiny random ``family`` model and its tokenizer into ``out``; returns ``out``."""
    import transformers
    from transformers import AutoModelForCausalLM

    cls, own, case = FAMILIES[family]
    tok = tokenizer_for(case, tiny_path)
    cfg = getattr(transformers, cls)(**{
        "vocab_size": len(tok), "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "max_position_embeddings": 512, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id, **own})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:  # larger than the 0.02 init so the logits are not nearly uniform (as the tiny Llama)
                p.normal_(0, 0.2)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
