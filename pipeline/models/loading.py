"""Loading a base model: device and compute dtype, NF4 quantisation, the bitsandbytes CPU guard,
the tokenizer, LoRA configs.

Every model the pipeline touches is loaded through :func:`load_base`, which guards against the
bitsandbytes CPU trap (see :func:`guard_bnb_cpu`) before any forward pass can happen. Names resolve to
folders in :mod:`pipeline.models.embedded`; adapters on the loaded base live in
:mod:`pipeline.models.stacking`.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from pipeline.artifacts.hashing import tokenizer_hash, weights_hash
from pipeline.config import LoraConfigSection, ModelConfig
from pipeline.models.embedded import ModelError, resolve_model_path


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
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    if cap and not _onednn_cap_has_bf16(cap):
        # oneDNN runs torch's bf16 matmuls; capped below its bf16 ISAs it emulates them: 1.0 GFLOP/s
        # against 201 in float32 under ONEDNN_MAX_CPU_ISA=AVX2 on an AMX Xeon (`rlhf doctor`, measured).
        return False
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    try:
        return any(check() for check in checks if check is not None)
    except RuntimeError:
        return False


def _onednn_cap_has_bf16(cap: str) -> bool:
    """Whether a ``ONEDNN_MAX_CPU_ISA`` value still allows oneDNN's bf16 kernels (AVX512_CORE_BF16 and the
    ISAs above it: AMX, AVX512_CORE_FP16, AVX10); ``ALL`` and ``DEFAULT`` set no cap."""
    return cap in ("ALL", "DEFAULT") or any(k in cap for k in ("BF16", "AMX", "FP16", "AVX10"))


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
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    why = f"ONEDNN_MAX_CPU_ISA={cap} leaves oneDNN no bf16 kernels" if cap else "this CPU has no AMX/AVX512-BF16"
    return (f"compute dtype {dtype} (auto: {why}, where bf16 would be emulated and "
            "slower; set model.compute_dtype=bfloat16 to force it)")


def attn_implementation(cfg: ModelConfig, device: torch.device) -> Optional[str]:
    """"auto": eager attention on CPU, the transformers default (sdpa) elsewhere.

    On CPU, torch's fused attention backward is the single largest op of a PPO forward+backward
    over short sequences (9 ms per layer for 8 x 72 tokens on the embedded model); the eager
    softmax(QK^T)V path made the backward 1.3x faster there (measured, see README)."""
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    return "eager" if device.type == "cpu" else None


@contextlib.contextmanager
def decode_attention(model: torch.nn.Module) -> Iterator[None]:
    """sdpa attention while sampling where "auto" chose eager for training (CPU; see
    :func:`attn_implementation`), the loaded implementation back afterwards.

    A decode step's eager attention expands every grouped key/value head of the cache to the query heads
    (``repeat_kv``, a copy of the whole cache per layer per step: 16% of sampling 128 rows on the
    embedded default), sdpa reads the grouped heads in place; 128 rows x 32 tokens took 15.9 s against
    20.4 s (float32, AMD EPYC under the AVX2 caps). The two compute the same attention: the same tokens
    are drawn and log-probabilities agree to float round-off (tested). Only the config's implementation
    name changes, so switching costs nothing; a family that cannot switch keeps eager."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    want = vars(inner).get("_rlhf_decode_attn")
    had = getattr(inner.config, "_attn_implementation", None)
    if want is None or want == had:
        yield
        return
    try:
        inner.set_attn_implementation(want)
    except (ValueError, ImportError):
        inner._rlhf_decode_attn = None  # not tried again for this model
        yield
        return
    try:
        yield
    finally:
        inner.set_attn_implementation(had)


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


def resident_bytes() -> Optional[int]:
    """This process's resident set size in bytes (Linux ``/proc/self/statm``); None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


# HeapTrim's margin in SFT's training loop (the trainer's ReleaseMemory callback).
STEP_TRIM_MARGIN_MB = 256


class HeapTrim:
    """:func:`release_free_memory` at the end of a training step, once the resident set has grown by more
    than ``margin_mb`` since the last trim (always where the size cannot be read).

    A trim hands the step's freed activations back to the OS, and the next step page-faults them all in
    again: trimming after every SFT step made 2.5-2.8M minor faults in 8 steps against 1.1-1.2M and took
    1.13x the training time (30.9 and 32.9 s against 27.3 and 28.9 s, float32, AMD EPYC under the AVX2
    caps). Without any trim glibc's heap creeps up as batch shapes vary: 2.67 GB against 2.23 GB at the
    end of the default SFT run. A margin keeps the peak within it of trimming every step, for a trim
    every few dozen steps. The reward and PPO loops still trim every step. In the reward stage a margin
    did not change the faults (10 steps: 2.60-2.69M with 256 MB against 2.71-2.77M, training time within
    noise). In ``make bench``'s PPO setting it raised the peak by up to 81 MB, and that peak is a target.
    """

    def __init__(self, margin_mb: float):
        self.margin = margin_mb * 2**20
        self.floor: Optional[int] = None

    def __call__(self) -> bool:
        """Trim if due; returns whether it trimmed."""
        rss = resident_bytes()
        if rss is not None and self.floor is not None and rss <= self.floor + self.margin:
            return False
        release_free_memory()
        self.floor = resident_bytes()
        return True


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


def load_tokenizer(path: str, chat_template: str = "auto", name: Optional[str] = None):
    """The tokenizer, left-padding, with the chat template ``model.chat_template`` selects
    (:mod:`pipeline.models.templates`). Without a pad token it pads with EOS: every pad position is
    masked out, and scores pool by mask, not by searching for the pad id."""
    from transformers import AutoTokenizer

    from pipeline.models import templates

    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    templates.apply(tok, chat_template, name or path)
    return tok


def _check_family(path: str, name: str, kind: str) -> None:
    """A :class:`ModelError` naming the model when transformers has no causal-LM (or, for the reward model,
    sequence-classification) class for its architecture, instead of transformers' error deep in a stage."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    config = AutoConfig.from_pretrained(path)
    model_type = getattr(config, "model_type", None)
    needed = [(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "causal-LM class (every stage needs one)")]
    if kind == "seqcls":
        needed.append((MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
                       "sequence-classification class (the reward stage's model)"))
    for mapping, what in needed:
        if model_type not in mapping:
            raise ModelError(f"model.name={name}: transformers has no {what} for model type {model_type!r}; "
                             "use a decoder-only model (README, Bring your own model)")
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES or getattr(config, "is_encoder_decoder", False):
        # BERT, RoBERTa, BART ... have a causal-LM class for use as a decoder, but are encoders (or
        # encoder-decoders) at heart; peft and bitsandbytes fail on their poolers deep in a stage.
        raise ModelError(f"model.name={name}: model type {model_type!r} is an encoder or encoder-decoder "
                         "(BERT-like, T5-like); the stages need a decoder-only model (README, Bring your own model)")


def load_base(cfg: ModelConfig, kind: str = "causal", device: Optional[torch.device] = None,
              num_labels: int = 1):
    """Load the base model (NF4 4-bit by default), guarded, with its tokenizer and identity.

    ``kind`` is "causal" (AutoModelForCausalLM) or "seqcls" (AutoModelForSequenceClassification with
    ``num_labels`` outputs). Returns ``(model, tokenizer, BaseInfo)``.
    """
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        BitsAndBytesConfig,
    )

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
    tok = load_tokenizer(path, cfg.chat_template, cfg.name)
    _check_family(path, cfg.name, kind)
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
    else:
        dense_4bit_compute(model, cfg.dequantize_max_gb)
    _detach_from_file(model)
    _contiguous_head_input(model)
    model.config.use_cache = False
    if cfg.attn_implementation == "auto" and attn == "eager":
        model._rlhf_decode_attn = "sdpa"  # see decode_attention
    info = BaseInfo(name=cfg.name, path=path, weights_sha256=weights_hash(path),
                    tokenizer_sha256=tokenizer_hash(tok), quantization=quantization_info(cfg, device))
    return model, tok, info


def lora_config(section: LoraConfigSection, task_type: str = "CAUSAL_LM", model=None, **extra):
    """peft LoraConfig for a config section; ``model`` is needed when ``section.top_layers`` limits the
    adapter to the top layers (found by :func:`decoder_layers`)."""
    from peft import LoraConfig

    targets = section.target_modules
    from transformers.pytorch_utils import Conv1D

    if model is not None and any(isinstance(m, Conv1D) for m in model.modules()):
        # GPT-2's unquantized Conv1D stores weight as in x out. peft flips fan_in_fan_out on per layer but
        # saves the config as given, so adapters made here and ones reloaded would disagree (fuse refuses).
        extra.setdefault("fan_in_fan_out", True)
    if section.top_layers:
        if model is None:
            raise ValueError("lora.top_layers needs the model (its decoder layers)")
        n = len(decoder_layers(model)[1])
        extra["layers_to_transform"] = list(range(max(n - section.top_layers, 0), n))
        if targets == "all-linear":  # peft takes layers_to_transform only with explicit module names
            targets = _decoder_linear_names(model)
    return LoraConfig(r=section.r, lora_alpha=section.alpha, lora_dropout=section.dropout, bias=section.bias,
                      target_modules=targets, task_type=task_type, **extra)


def text_config(model: torch.nn.Module):
    """The language model's config (``config.get_text_config()``: the text half of a multimodal config)."""
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def hidden_size(model: torch.nn.Module) -> int:
    """Width of the backbone's final hidden states, from the text config (GPT-2's ``n_embd`` maps to it)."""
    return int(text_config(model).hidden_size)


def decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """``(path, layers)``: the decoder's stack of ``num_hidden_layers`` blocks, on any family.

    Found from what transformers exposes, not one family's names: the ModuleList of that length inside
    ``get_decoder()`` (``model.layers`` on Llama, ``transformer.h`` on GPT-2, ``gpt_neox.layers``,
    ``model.decoder.layers`` on OPT). ``path`` is its dotted name in ``model`` (plain or peft)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    n = getattr(text_config(inner), "num_hidden_layers", None)
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else None
    decoder = decoder if isinstance(decoder, torch.nn.Module) else getattr(inner, "base_model", inner)
    found = [m for m in decoder.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n]
    if n is None or len(found) != 1:
        raise ValueError(f"{type(inner).__name__}: cannot find its {n} decoder layers (one ModuleList of "
                         "config.num_hidden_layers blocks); set lora.top_layers=0 for this model")
    path = next(name for name, m in model.named_modules() if m is found[0])
    return path, found[0]


def _linear_classes() -> tuple[type, ...]:
    """What peft's "all-linear" adapts: torch Linear (bitsandbytes' Linear4bit is one) and GPT-2's Conv1D."""
    from transformers.pytorch_utils import Conv1D

    return (torch.nn.Linear, Conv1D)


def _decoder_linear_names(model: torch.nn.Module) -> list[str]:
    """Names of the linear modules inside the decoder layers, e.g. q_proj ... down_proj on Llama, c_attn,
    c_proj, c_fc on GPT-2 (Conv1D), query_key_value ... on NeoX: what peft's "all-linear" selects there."""
    path, _ = decoder_layers(model)
    prefix = f"{path}."
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
             if isinstance(m, _linear_classes()) and name.startswith(prefix)}
    if not names:
        raise ValueError("lora.top_layers: found no linear modules inside the decoder layers")
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


def logical_shape(weight) -> torch.Size:
    """A weight's shape as the model uses it: a 4-bit weight's original shape (bitsandbytes keeps it in
    ``quant_state.shape``), not the shape of its packed bytes."""
    state = getattr(weight, "quant_state", None)
    return torch.Size(state.shape) if state is not None else weight.shape


def dense_4bit_compute(model: torch.nn.Module, max_gb: float) -> int:
    """Dequantize every 4-bit linear of ``model`` once, into its compute dtype, and make its forward use that
    copy: ``x @ W^T + b`` in the compute dtype, the output cast back to the input's dtype, as bitsandbytes'
    ``Linear4bit`` computes it after dequantizing ``W`` on each call. Only when the copies take at most
    ``max_gb``; returns their bytes (0: not applied). The packed 4-bit weights stay what is stored,
    hashed and merged; the copies are plain attributes, outside the state dict, and no gradient flows
    into them (the base is frozen)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    if not layers:
        return 0
    dtypes = [getattr(m, "compute_dtype", None) or torch.float32 for m in layers]
    size = sum(logical_shape(m.weight).numel() * torch.empty((), dtype=d).element_size() for m, d in zip(layers, dtypes))
    if size > max_gb * 2**30:
        return 0
    with torch.no_grad():
        for m, dtype in zip(layers, dtypes):
            m.dense_weight = dense_weight(m).to(dtype)  # exact: bitsandbytes dequantizes into this dtype
            m.forward = _dense_4bit_forward(m)
    print(f"[model] 4-bit weights dequantized once for compute: {size / 2**20:,.0f} MB in "
          f"{str(dtypes[0]).replace('torch.', '')} (model.dequantize_max_gb={max_gb:g})", flush=True)
    return size


def _dense_4bit_forward(module: torch.nn.Module):
    def forward(x, *args, **kwargs):
        weight = module.dense_weight
        bias = None if module.bias is None else module.bias.to(weight.dtype)
        return torch.nn.functional.linear(x.to(weight.dtype), weight, bias).to(x.dtype)
    return forward


def dense_weight(layer: torch.nn.Module) -> torch.Tensor:
    """A new float32 tensor holding a linear layer's weight (callers add to it in place); 4-bit
    weights dequantized exactly as bitsandbytes does (the copy :func:`dense_4bit_compute` keeps, when it
    did: it holds that dequantization in its own dtype)."""
    weight = layer.weight
    if getattr(layer, "dense_weight", None) is not None:
        return layer.dense_weight.to(torch.float32, copy=True)
    if weight.__class__.__name__ == "Params4bit":
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(weight.data, weight.quant_state).to(torch.float32, copy=True)
    from transformers.pytorch_utils import Conv1D

    if isinstance(layer, Conv1D):  # GPT-2's Conv1D keeps its weight as in x out
        return weight.detach().t().to(torch.float32, copy=True).contiguous()
    return weight.detach().to(torch.float32, copy=True)


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
            state[f"{name}.weight"] = dense_weight(module)
            if module.bias is not None:
                state[f"{name}.bias"] = module.bias.detach().float()
    for name, p in nf4.named_parameters():
        if name not in state and p.dtype.is_floating_point:
            state[name] = p.detach().float()
    config = nf4.config
    config.__dict__.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # bitsandbytes stores GPT-2's Conv1D layers (weight in x out) as Linear4bit (out x in): back to Conv1D's.
    from transformers.pytorch_utils import Conv1D

    for name, module in plain.named_modules():
        if isinstance(module, Conv1D) and f"{name}.weight" in state:
            state[f"{name}.weight"] = state[f"{name}.weight"].t().contiguous()
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
