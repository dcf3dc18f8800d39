"""One base, many adapters: switching which adapters are active (the reference is the same base with
adapters off), attaching, saving and stacking adapters by name, and merged sampling weights (each
4-bit linear's dense weight with its active LoRA deltas folded in, swapped into the forward for the
duration of a generate).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Optional

import torch

from pipeline.artifacts import readers
from pipeline.artifacts.outputs import ArtifactError
from pipeline.models import few_rows
from pipeline.models.loading import dense_weight, logical_shape, release_free_memory


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
    return sum(logical_shape(m.weight).numel() * size for m in layers.values())


def sample_from_merged(model: torch.nn.Module, mode: str, max_gb: float, dtype: torch.dtype) -> bool:
    """Whether sampling should use :func:`merged_linear_weights` (``ppo.rollout_weights``): always for
    "merged", never for "adapters", and for "auto" when the dense copy takes at most ``max_gb``."""
    return mode == "merged" or (mode == "auto" and dense_weight_bytes(model, dtype) <= max_gb * 2**30)


def _dense_forward(weight: torch.Tensor, bias: Optional[torch.Tensor]):
    def forward(x, *args, **kwargs):
        return few_rows.linear(x.to(weight.dtype), weight, bias)
    return forward


def patch_forward(patched: list, module: torch.nn.Module, forward) -> None:
    """Give ``module`` an instance ``forward`` for a while; ``patched`` records what
    :func:`restore_forwards` puts back."""
    patched.append((module, vars(module).get("forward")))
    module.forward = forward


def restore_forwards(patched: list) -> None:
    """Undo :func:`patch_forward`, newest first: a forward already set on an instance before
    (pipeline.models.lean_ops) comes back, otherwise the class's."""
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
    left as they are. These layers and a plain LM head compute a call of a few rows (a decode step) in
    the GEMM orientation :mod:`pipeline.models.few_rows` picks.
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
                kept = getattr(base, "dense_weight", None)
                if not active and kept is not None and kept.dtype == dtype:
                    # nothing to merge and the load's dense copy is the weight: used as it is, not copied
                    # (with the policy on the top layers, most layers; 270 MB of 405 on the embedded model)
                    patch_forward(patched, layer, _dense_forward(kept, None if base.bias is None else
                                                                 base.bias.detach().to(dtype)))
                    continue
                weight = dense_weight(base)
                for name in active:
                    weight += layer.scaling[name] * (layer.lora_B[name].weight.float()
                                                      @ layer.lora_A[name].weight.float())
                bias = None if base.bias is None else base.bias.detach().to(dtype)
                patch_forward(patched, layer, _dense_forward(weight.to(dtype), bias))
            head = model.get_output_embeddings()
            if type(head) is torch.nn.Linear and id(head) not in wrapped:
                # the LM head of a decode step is its largest GEMM (49152 x 576 on the embedded model)
                patch_forward(patched, head, _dense_forward(head.weight.detach(), None if head.bias is None
                                                            else head.bias.detach()))
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

    adapter_dir = Path(adapter_dir)
    readers.check_adapter_folder(adapter_dir)
    cfg = LoraConfig.from_pretrained(str(adapter_dir))
    cfg.task_type = "CAUSAL_LM"
    cfg.modules_to_save = None
    cfg.inference_mode = True
    state = readers.load_tensors(adapter_dir / readers.ADAPTER_WEIGHTS)
    lora_state = {k: v for k, v in state.items() if ".lora_" in k}
    others = {k: v for k, v in state.items() if ".lora_" not in k}
    peft_model.add_adapter(name, cfg)
    result = set_peft_model_state_dict(peft_model, lora_state, adapter_name=name)
    missing = [k for k in result.missing_keys if f".{name}." in k and "lora_" in k]
    if missing:
        raise ArtifactError(f"adapter {adapter_dir} does not fit this base (missing {missing[:3]}): it was "
                            "trained on another model; use an adapter trained on the configured model.name")
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


def lora_config_of(adapter_dir: str | Path):
    """The peft LoraConfig of a saved adapter folder, checked readable first."""
    from peft import LoraConfig

    readers.check_adapter_folder(adapter_dir)
    return LoraConfig.from_pretrained(str(adapter_dir))


def load_frozen_adapter(peft_model, adapter_dir: str | Path, name: str) -> None:
    """peft's ``load_adapter`` (frozen, as ``name``) of a folder checked readable first."""
    readers.check_adapter_folder(adapter_dir)
    peft_model.load_adapter(str(adapter_dir), adapter_name=name, is_trainable=False)


def load_adapter_weights(peft_model, name: str, adapter_dir: str | Path) -> None:
    """Overwrite the weights of an existing adapter ``name`` from a saved folder (e.g. on resume)."""
    from peft import set_peft_model_state_dict

    state = readers.load_tensors(Path(adapter_dir) / readers.ADAPTER_WEIGHTS)
    result = set_peft_model_state_dict(peft_model, state, adapter_name=name)
    if result.unexpected_keys:
        raise ArtifactError(f"{adapter_dir} does not fit adapter '{name}' (unexpected {result.unexpected_keys[:3]}): "
                            "it was saved with another LoRA rank, targets or layers; use the config it was trained with")
    missing = [k for k in result.missing_keys if f".{name}." in k]
    if missing:
        raise ArtifactError(f"{adapter_dir} does not fit adapter '{name}' (missing {missing[:3]}): it was saved "
                            "with another LoRA rank, targets or layers; use the config it was trained with")


def stack_adapters(base_model, adapter_dirs: dict[str, str | Path], trainable: Optional[str] = None,
                   new_adapter=None):
    """Wrap ``base_model`` in one PeftModel holding several named adapters (frozen unless ``trainable``).

    ``new_adapter`` is an optional ``(name, LoraConfig)`` for a freshly initialised adapter.
    Returns the PeftModel with every named adapter active (deltas add up).
    """
    from peft import PeftModel, get_peft_model

    peft_model = None
    for name, path in adapter_dirs.items():
        readers.check_adapter_folder(path)
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
