"""LoRA adapters as tensors, shared by both fusion methods (``cat``/weighted in
:mod:`pipeline.stages.fuse`, ``learned`` in :mod:`pipeline.fusion.learned`): reading and checking the
source adapters, per-module deltas and scalings, the exact rank-concatenation (:func:`cat_lora`), and
adapter folders written and read without a model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from pipeline.artifacts import readers
from pipeline.artifacts.hashing import sha256_file
from pipeline.artifacts.outputs import ArtifactError, check_same_base, read_manifest

ADAPTER_FILE = "adapter_model.safetensors"


_KEY_PREFIX = "base_model.model."


_A, _B = ".lora_A.weight", ".lora_B.weight"


# LoRA options whose adapters are not plain "W + s * B @ A" and cannot be fused here.
_UNSUPPORTED = {"use_dora": "DoRA", "lora_bias": "lora_bias", "modules_to_save": "modules_to_save",
                "target_parameters": "target_parameters", "trainable_token_indices": "trainable tokens",
                "use_qalora": "QALoRA", "alora_invocation_tokens": "aLoRA", "layer_replication": "layer_replication"}


class FuseError(ArtifactError):
    """The adapters cannot be fused as asked; the message says which one and why."""


@dataclass
class Source:
    """One adapter to fuse: its folder, stage manifest, LoRA config and content hash."""

    name: str
    path: Path
    manifest: dict
    config: object  # peft.LoraConfig
    sha256: str


def check_lora_config(config, where: str) -> None:
    """Refuse adapters that are not plain causal-LM LoRA (W + s * B @ A with no bias)."""
    if str(config.peft_type).split(".")[-1] != "LORA":
        raise FuseError(f"{where}: only LoRA adapters can be fused, this is {config.peft_type}")
    if str(config.task_type).split(".")[-1] != "CAUSAL_LM":
        raise FuseError(f"{where}: task_type {config.task_type} is not CAUSAL_LM (a reward model?); only policy "
                        "adapters (sft, ppo) can be fused into a causal LM")
    if config.bias != "none":
        raise FuseError(f"{where}: bias='{config.bias}' trains base-layer biases; fusion handles bias='none' only")
    for field, label in _UNSUPPORTED.items():
        if getattr(config, field, None):
            raise FuseError(f"{where}: {label} adapters are not supported by fusion")
    if config.init_lora_weights not in (True, False, "gaussian"):
        raise FuseError(f"{where}: init_lora_weights='{config.init_lora_weights}' changes the base weights; "
                        "such adapters cannot be fused onto the original base")


def read_sources(paths: list[Path], base) -> list[Source]:
    """Read each adapter folder's manifest and config; refuse another base or an unsupported adapter."""
    from peft import LoraConfig

    sources: list[Source] = []
    for path in paths:
        manifest = read_manifest(path)
        check_same_base(manifest, base, f"adapter {path}")
        if not (path / ADAPTER_FILE).is_file():
            raise FuseError(f"{path} has no {ADAPTER_FILE}; it is not an adapter folder")
        readers.check_adapter_folder(path)
        config = LoraConfig.from_pretrained(str(path))
        check_lora_config(config, str(path))
        stage = manifest.get("stage") or path.name
        name, i = stage, 1
        while any(s.name == name for s in sources):  # two adapters of one stage need distinct names
            name, i = f"{stage}_{i}", i + 1
        sources.append(Source(name, path, manifest, config, sha256_file(path / ADAPTER_FILE)))
    return sources


def check_stacking(sources: list[Source]) -> None:
    """Refuse an adapter trained stacked on another (PPO on SFT) unless that very adapter is fused too.

    A PPO delta was learned on top of the SFT delta: without it (or with another SFT adapter) the
    result is not the trained policy.
    """
    hashes = {s.sha256 for s in sources}
    stages = {s.manifest.get("stage") for s in sources}
    for s in sources:
        consumed = s.manifest.get("adapters", {})
        for below in s.manifest.get("stacked_on", []):
            want = consumed.get(below, {}).get("sha256")
            if (want and want not in hashes) or (not want and below not in stages):
                detail = f"{consumed.get(below, {}).get('path', below)} (sha256 {str(want)[:12]})" if want else below
                raise FuseError(f"{s.path} was trained stacked on {detail}, which is not among fuse.adapters; "
                                f"the policy is base + {below} + {s.name}, so list both adapters")


def lora_modules(state: dict[str, torch.Tensor], where: str = "adapter") -> dict[str, tuple[torch.Tensor, ...]]:
    """``{module path in the base model: (A [r, in], B [out, r])}`` from a saved adapter state dict."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key in state:
        if not key.endswith(_A):
            if not key.endswith(_B):
                raise FuseError(f"{where}: unexpected tensor '{key}' (only lora_A / lora_B weights can be fused)")
            continue
        module = key[: -len(_A)]
        if (module + _B) not in state:
            raise FuseError(f"{where}: '{module}' has lora_A but no lora_B")
        out[module.removeprefix(_KEY_PREFIX)] = (state[key].float(), state[module + _B].float())
    return out


def lora_scaling(config, module: str, r: int) -> float:
    """peft's scaling for ``module``: alpha / r, or alpha / sqrt(r) with rsLoRA (alpha_pattern honoured)."""
    from peft.utils.other import get_pattern_key

    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
    return alpha / math.sqrt(r) if config.use_rslora else alpha / r


def lora_deltas(config, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{module: s * B @ A}``: the weight change one adapter makes to each module it targets."""
    return {m: lora_scaling(config, m, a.shape[0]) * (b @ a) for m, (a, b) in lora_modules(state).items()}


def cat_lora(configs: list, states: list[dict[str, torch.Tensor]], weights: list[float], base_path: str = "",
             module_weights: Optional[dict[str, list[float]]] = None):
    """One LoRA adapter equal to the weighted sum of several: ``(LoraConfig, state dict)``.

    ``module_weights`` gives some modules their own weights (one per adapter), e.g. a learned
    fusion's mean gate (pipeline/fuse_learned.py); the others take ``weights``.

    delta_W = sum_i w_i s_i B_i A_i = [w_1 s_1 B_1 | w_2 s_2 B_2 | ...] @ [A_1; A_2; ...]
    so A = concat_rows(A_i), B = concat_cols(w_i s_i B_i), r = lora_alpha = sum_i r_i (scaling 1).
    Each adapter owns a block of r_i rows (its largest rank); a module it lacks, or where its
    rank_pattern gives fewer rows, gets zeros there. ``target_modules`` is the union of the exact
    module paths the adapters hold, so the result does not depend on how they named their targets.
    """
    from peft import LoraConfig

    if len({bool(c.fan_in_fan_out) for c in configs}) > 1:
        raise FuseError("adapters disagree on fan_in_fan_out; they cannot be concatenated")
    mods = [lora_modules(s, f"adapter {i}") for i, s in enumerate(states)]
    widths = [max(a.shape[0] for a, _ in m.values()) for m in mods]
    shapes: dict[str, tuple[int, int]] = {}
    for m in mods:
        for name, (a, b) in m.items():
            if shapes.setdefault(name, (b.shape[0], a.shape[1])) != (b.shape[0], a.shape[1]):
                raise FuseError(f"adapters disagree on the shape of {name}")
    state: dict[str, torch.Tensor] = {}
    for name, (n_out, n_in) in sorted(shapes.items()):
        blocks_a, blocks_b = [], []
        here = (module_weights or {}).get(name, weights)
        for config, m, width, w in zip(configs, mods, widths, here):
            a_i, b_i = torch.zeros(width, n_in), torch.zeros(n_out, width)
            if name in m:
                a, b = m[name]
                a_i[: a.shape[0]] = a
                b_i[:, : a.shape[0]] = (w * lora_scaling(config, name, a.shape[0])) * b
            blocks_a.append(a_i)
            blocks_b.append(b_i)
        state[_KEY_PREFIX + name + _A] = torch.cat(blocks_a, 0).contiguous()
        state[_KEY_PREFIX + name + _B] = torch.cat(blocks_b, 1).contiguous()
    r = sum(widths)
    config = LoraConfig(r=r, lora_alpha=r, target_modules=sorted(shapes), lora_dropout=0.0, bias="none",
                        use_rslora=False, fan_in_fan_out=bool(configs[0].fan_in_fan_out), task_type="CAUSAL_LM",
                        base_model_name_or_path=base_path or configs[0].base_model_name_or_path, inference_mode=True)
    return config, state


def save_lora(folder: Path, config, state: dict[str, torch.Tensor]) -> None:
    """Write a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / ADAPTER_FILE))
    config.save_pretrained(str(folder))


def load_lora_state(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of a saved adapter folder."""
    return readers.load_tensors(Path(folder) / ADAPTER_FILE)


def delta_rel_error(sources: list[Source], weights: list[float], fused_dir: Path) -> float:
    """||delta_fused - sum_i w_i delta_i||_F / ||sum_i w_i delta_i||_F over all modules (0 for an exact fusion)."""
    from peft import LoraConfig

    want: dict[str, torch.Tensor] = {}
    for s, w in zip(sources, weights):
        for m, d in lora_deltas(s.config, load_lora_state(s.path)).items():
            want[m] = want.get(m, 0) + w * d
    got = lora_deltas(LoraConfig.from_pretrained(str(fused_dir)), load_lora_state(fused_dir))
    err = sum(float((got.get(m, 0) - d).pow(2).sum()) for m, d in want.items())
    err += sum(float(d.pow(2).sum()) for m, d in got.items() if m not in want)
    return math.sqrt(err) / max(math.sqrt(sum(float(d.pow(2).sum()) for d in want.values())), 1e-30)
