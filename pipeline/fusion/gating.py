"""Learned adapter fusion: a per-layer, per-token gate over frozen LoRA adapters on one (NF4) base.

AdapterFusion (Pfeiffer et al. 2021, "AdapterFusion: Non-Destructive Task Composition for Transfer
Learning", arXiv 2005.00247) keeps trained adapters frozen and learns, per layer and per token, how
much of each adapter's output to use. Its attention (query/key/value matrices of hidden x hidden per
layer) is sized for bottleneck adapters; on LoRA we gate each adapter's *delta* directly (DESIGN.md
section 10). At every LoRA linear ``m`` holding adapters ``i = 1..K``::

    y = W x + sum_i g_i(x) * s_i * B_i A_i x,      g(x) = K * softmax(V_m x + c_m)   (float32)

``V_m`` (K x in_features) and ``c_m`` (K) start at zero, so every ``g_i = 1`` and the model is
exactly the stacked adapters (SFT + PPO, the trained policy). Only ``V`` and ``c`` train. The gate of
a token depends only on that token's own input to the layer: one forward pass, causal, and the KV
cache works unchanged. Because the weights depend on the input there is no exact merged export; the
mean gate folds into one weighted LoRA adapter as a labelled approximation (:func:`fold_mean_gate`).

The saved artifact (``RUN/fused`` with ``fuse.method: learned``)::

    fusion.json           format, adapter names in gate order, each gated module and its adapters
    gate.safetensors      "<module>.weight" (K_m, in_features) and "<module>.bias" (K_m), float32
    adapters/<name>/      the frozen adapters, byte-for-byte copies of the stage outputs
    adapter/              the mean gate folded into one PEFT LoRA adapter (an approximation)

:func:`load` puts it onto a plain transformers model (NF4 or not) in one call.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.artifacts import readers
from pipeline.artifacts.outputs import ArtifactError

FORMAT = "rlhf-lora-fusion"
VERSION = 1
FUSION_FILE = "fusion.json"
GATE_FILE = "gate.safetensors"
ADAPTERS_DIR = "adapters"
_PEFT_PREFIX = "base_model.model."


# ---------------------------------------------------------------------------------------------
# Pure math


def gate_weights(logits: torch.Tensor) -> torch.Tensor:
    """Gate weights ``K * softmax(logits)`` over the last dimension.

    Args:
        logits: ``(..., K)``, any float dtype (computed in float32).

    Returns:
        ``(..., K)`` float32, each row summing to K. Zero logits give exactly 1 for every adapter
        (softmax of K equal values is 1/K), the stacked model. The factor K keeps that start exact,
        where AdapterFusion's plain softmax would average the adapters (Pfeiffer et al. 2021, eq. 1-3).
    """
    return logits.shape[-1] * torch.softmax(logits.float(), dim=-1)


def mix_deltas(base_out: torch.Tensor, deltas: Sequence[torch.Tensor], gates: torch.Tensor) -> torch.Tensor:
    """``base_out + sum_i gates[..., i] * deltas[i]``, the gated layer output.

    Args:
        base_out: ``(..., out)`` the frozen layer's output ``W x``.
        deltas: K tensors ``(..., out)``, each adapter's scaled output ``s_i B_i A_i x``.
        gates: ``(..., K)`` float32 weights.

    Returns:
        ``(..., out)`` in ``base_out``'s dtype. Each gated term is formed in float32 and added in turn
        in ``base_out``'s dtype, as peft adds one adapter after another: with gates of exactly 1 the
        result is bit-identical to peft's stacked adapters in bf16 too (a single float32 sum added
        once moved the embedded model's logits by up to 1.1 after 30 bf16 layers).
    """
    if gates.shape[-1] != len(deltas):
        raise ValueError(f"{gates.shape[-1]} gate weights for {len(deltas)} adapter outputs")
    out = base_out
    for i, d in enumerate(deltas):
        # float32 gate times the delta as it is: type promotion forms the product in float32 while autograd
        # keeps only the two inputs, not a float32 copy of the delta (which cost ~1.5 GB on the embedded model)
        out = out + (gates[..., i:i + 1] * d).to(base_out.dtype)
    return out


def masked_gate_mean(gates: torch.Tensor, mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, float]:
    """Sum of the gate rows where ``mask`` is set, and how many rows that is: ``((K,), count)``.

    ``gates`` ``(B, T, K)`` (or ``(N, K)``); ``mask`` ``(B, T)`` of 0/1 (None: every row).
    """
    flat = gates.reshape(-1, gates.shape[-1]).float()
    if mask is None:
        return flat.sum(0), float(flat.shape[0])
    m = mask.reshape(-1).to(flat.dtype)
    if m.shape[0] != flat.shape[0]:
        return flat.sum(0), float(flat.shape[0])  # a decode step: no mask for it
    return (flat * m[:, None]).sum(0), float(m.sum())


# ---------------------------------------------------------------------------------------------
# The gates


class _GateLogits(torch.autograd.Function):
    """``x W^T + b`` in float32 for a bf16/fp16 ``x``, keeping ``x`` itself for backward.

    ``F.linear(x.float(), W, b)`` would keep a float32 copy of every gated layer's input for W's gradient;
    ``x`` is kept anyway by the layer it feeds, so saving it costs nothing and the copy is made again
    in backward, one layer at a time.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return F.linear(x.to(weight.dtype), weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_x = (grad @ weight).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_w = g2.t() @ x.reshape(-1, x.shape[-1]).to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_b = g2.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


class Gate(nn.Module):
    """The gate of one LoRA linear over ``adapters`` (the names it mixes, in order)."""

    def __init__(self, in_features: int, adapters: Sequence[str]):
        super().__init__()
        self.adapters = list(adapters)
        self.weight = nn.Parameter(torch.zeros(len(self.adapters), in_features))
        self.bias = nn.Parameter(torch.zeros(len(self.adapters)))
        self.fixed: Optional[torch.Tensor] = None  # (K,) constant weights instead of the learned gate
        self.sums: Optional[torch.Tensor] = None  # running sums while recording (Fusion.recording)
        self.count = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., in)`` -> ``(..., K)`` float32 weights."""
        if self.fixed is not None:
            return self.fixed.to(x.device, torch.float32).expand(*x.shape[:-1], len(self.adapters))
        # float32 even under bf16 autocast: the gate is small and its logits are differences of sums
        with torch.autocast(x.device.type, enabled=False):
            return gate_weights(_GateLogits.apply(x, self.weight, self.bias))


class Fusion(nn.Module):
    """Every gate of one model, keyed by module path (``model.layers.0.self_attn.q_proj``).

    ``adapters`` names the fused adapters in a fixed order (the artifact's order); a gate mixes the
    ones its module holds.
    """

    def __init__(self, adapters: Sequence[str], modules: dict[str, tuple[int, Sequence[str]]]):
        super().__init__()
        self.adapters = list(adapters)
        self.paths = sorted(modules)
        self.gates = nn.ModuleList(Gate(modules[p][0], modules[p][1]) for p in self.paths)
        self._mask: Optional[torch.Tensor] = None

    def items(self) -> Iterator[tuple[str, Gate]]:
        return zip(self.paths, self.gates)

    def set_fixed(self, weights: Optional[dict[str, Sequence[float]] | Sequence[float]]) -> None:
        """Replace every gate by constant weights (per adapter name, or one list per module path); None
        returns to the learned gates. Used for the one-hot / zero checks and the mean-gate approximation."""
        for path, g in self.items():
            if weights is None:
                g.fixed = None
            elif isinstance(weights, dict) and path in weights:
                g.fixed = torch.tensor(list(weights[path]), dtype=torch.float32)
            else:
                by_name = dict(zip(self.adapters, weights))
                g.fixed = torch.tensor([float(by_name[a]) for a in g.adapters], dtype=torch.float32)

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Accumulate each gate's weights over the tokens of the forwards run inside; read them with
        :meth:`mean_gates` before leaving. :meth:`token_mask` selects which tokens count."""
        for _, g in self.items():
            g.sums, g.count = torch.zeros(len(g.adapters), dtype=torch.float64), 0.0
        try:
            yield
        finally:
            self._mask = None
            for _, g in self.items():
                g.sums, g.count = None, 0.0

    def token_mask(self, mask: Optional[torch.Tensor]) -> None:
        """The (B, T) mask of the tokens the next forward's gates should be recorded for."""
        self._mask = mask

    def record(self, g: Gate, weights: torch.Tensor) -> None:
        if g.sums is None:
            return
        s, n = masked_gate_mean(weights.detach(), self._mask)
        g.sums += s.double().cpu()
        g.count += n

    def mean_gates(self) -> dict[str, list[float]]:
        """``{module path: mean weight per adapter}`` over the recorded tokens."""
        out = {}
        for path, g in self.items():
            if g.sums is None or g.count == 0:
                raise RuntimeError("no gate weights recorded: run forwards inside Fusion.recording()")
            out[path] = (g.sums / g.count).tolist()
        return out


# ---------------------------------------------------------------------------------------------
# On a peft model


def lora_layers(peft_model) -> dict[str, nn.Module]:
    """``{module path: peft LoRA layer}`` with paths as in the saved adapters (no ``base_model.model.``)."""
    from peft.tuners.lora import LoraLayer

    return {name.removeprefix(_PEFT_PREFIX): m for name, m in peft_model.named_modules()
            if isinstance(m, LoraLayer) and hasattr(m, "base_layer")}


def for_model(peft_model, slots: Sequence[str], names: Optional[Sequence[str]] = None) -> Fusion:
    """A zero-initialised :class:`Fusion` over the adapters loaded in ``peft_model`` as ``slots``, one
    gate per LoRA linear holding any of them. ``names`` labels the adapters (default: the slot names)."""
    names = list(names or slots)
    modules = {}
    for path, layer in lora_layers(peft_model).items():
        present = [n for n, s in zip(names, slots) if s in layer.lora_A]
        if present:
            modules[path] = (layer.in_features, present)
    if not modules:
        raise ValueError(f"none of the adapters {list(slots)} is loaded in this model")
    return Fusion(names, modules)


def _gated_forward(layer: nn.Module, gate: Gate, slots: list[str], fusion: Fusion):
    def forward(x, *args, **kwargs):
        result = layer.base_layer(x, *args, **kwargs)
        weights = gate(x)
        fusion.record(gate, weights)
        deltas = []
        for s in slots:
            a = layer.lora_A[s]
            # as peft computes it (its input cast, off under loading.compute_context's autocast), without
            # dropout: the adapters are frozen and the gate learns on what they really output
            deltas.append(layer.lora_B[s](a(layer._cast_input_dtype(x, a.weight.dtype))) * layer.scaling[s])
        return mix_deltas(result, deltas, weights)
    return forward


@contextlib.contextmanager
def gated(peft_model, fusion: Fusion, slots: Sequence[str]) -> Iterator[None]:
    """Run ``peft_model`` as the fusion: at each gated module, base + the gated sum of the adapters
    loaded as ``slots`` (``fusion.adapters[i]`` is loaded as ``slots[i]``), which are the only active
    adapters meanwhile (a module without a gate holds none of them: it runs its base layer). A forward
    already set on a layer instance (pipeline.models.lean_ops) comes back on exit."""
    from pipeline.models import stacking

    slot_of = dict(zip(fusion.adapters, slots))
    layers = lora_layers(peft_model)
    missing = [p for p in fusion.paths if p not in layers]
    if missing:
        raise ValueError(f"the fusion gates modules this model lacks, e.g. {missing[:2]}")
    patched = []
    with stacking.active_adapters(peft_model, list(slots)):
        try:
            for path, g in fusion.items():
                layer = layers[path]
                want = [slot_of[a] for a in g.adapters]
                absent = [s for s in want if s not in layer.lora_A]
                if absent:
                    raise ValueError(f"{path}: adapter slot(s) {absent} not loaded")
                stacking.patch_forward(patched, layer, _gated_forward(layer, g, want, fusion))
            yield
        finally:
            stacking.restore_forwards(patched)


# ---------------------------------------------------------------------------------------------
# Artifact


def save(fusion: Fusion, folder: Path, adapter_dirs: Sequence[Path], extra: Optional[dict] = None) -> None:
    """Write ``fusion.json``, ``gate.safetensors`` and byte copies of the adapters into ``folder``."""
    import shutil

    from safetensors.torch import save_file

    folder = Path(folder)
    (folder / ADAPTERS_DIR).mkdir(parents=True, exist_ok=True)
    for name, src in zip(fusion.adapters, adapter_dirs):
        dst = folder / ADAPTERS_DIR / name
        dst.mkdir()
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copyfile(Path(src) / f, dst / f)
    tensors = {}
    for path, g in fusion.items():
        tensors[f"{path}.weight"] = g.weight.detach().float().cpu().contiguous()
        tensors[f"{path}.bias"] = g.bias.detach().float().cpu().contiguous()
    save_file(tensors, str(folder / GATE_FILE))
    meta = {"format": FORMAT, "version": VERSION, "adapters": fusion.adapters,
            "gate": "K * softmax(W x + b), float32, per module and token (pipeline/fusion/gating.py)",
            "modules": {path: g.adapters for path, g in fusion.items()}, **(extra or {})}
    (folder / FUSION_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def read(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(fusion.json, gate tensors)`` of a saved fusion; a clear error if ``folder`` is not one."""
    folder = Path(folder)
    meta_path = folder / FUSION_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder} holds no {FUSION_FILE}: not a learned fusion (fuse.method=learned)")
    meta = readers.read_json(meta_path, "a learned fusion's description")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        found = (meta.get("format"), meta.get("version")) if isinstance(meta, dict) else (None, None)
        raise ArtifactError(f"{meta_path}: format {found[0]!r} version {found[1]!r}, expected {FORMAT!r} version "
                            f"{VERSION}{readers.remake_hint(meta_path)}")
    return meta, readers.load_tensors(folder / GATE_FILE)


def attach(peft_model, folder: Path, prefix: str = "") -> tuple[Fusion, list[str]]:
    """Load a saved fusion's adapters into ``peft_model`` (as ``prefix + name``) and build its gates.

    Returns ``(fusion, slots)``; run the fused model inside :func:`gated` ``(peft_model, fusion, slots)``.
    """
    folder = Path(folder)
    meta, tensors = read(folder)
    slots = [prefix + name for name in meta["adapters"]]
    for name, slot in zip(meta["adapters"], slots):
        if slot in peft_model.peft_config:  # loaded by the caller (load() starts the PeftModel with it)
            continue
        readers.check_adapter_folder(folder / ADAPTERS_DIR / name)
        peft_model.load_adapter(str(folder / ADAPTERS_DIR / name), adapter_name=slot, is_trainable=False)
    peft_model.eval()  # layers injected by load_adapter start in train mode (dropout)
    fusion = for_model(peft_model, slots, meta["adapters"])
    if set(fusion.paths) != set(meta["modules"]):
        raise ValueError(f"{folder}: the adapters cover {len(fusion.paths)} modules, {FUSION_FILE} gates "
                         f"{len(meta['modules'])}: the folder is inconsistent")
    with torch.no_grad():
        for path, g in fusion.items():
            if g.adapters != meta["modules"][path]:
                raise ValueError(f"{folder}: {path} mixes {g.adapters} here, {meta['modules'][path]} when saved")
            g.weight.copy_(tensors[f"{path}.weight"])
            g.bias.copy_(tensors[f"{path}.bias"])
    device = next(peft_model.parameters()).device
    fusion.to(device).requires_grad_(False)
    return fusion, slots


def load(model, folder: str | Path):
    """The saved fusion in ``folder`` on ``model`` (a plain transformers causal LM, loaded as the
    adapters were trained: same base, same quantization), ready for ``generate`` and forwards.

    Returns a PeftModel with the gates installed for good (``model.fusion`` holds them)::

        model = AutoModelForCausalLM.from_pretrained(base, quantization_config=nf4)
        model = pipeline.fusion.gating.load(model, "runs/default/fused")
    """
    from peft import PeftModel

    folder = Path(folder)
    meta, _ = read(folder)
    first = meta["adapters"][0]
    readers.check_adapter_folder(folder / ADAPTERS_DIR / first)
    peft_model = PeftModel.from_pretrained(model, str(folder / ADAPTERS_DIR / first), adapter_name=first,
                                           is_trainable=False)
    fusion, slots = attach(peft_model, folder)
    ctx = gated(peft_model, fusion, slots)
    ctx.__enter__()  # never exited: the gates stay installed for the model's lifetime
    peft_model.fusion = fusion
    peft_model._fusion_context = ctx
    return peft_model
