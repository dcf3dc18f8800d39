"""Stage 4 (optional): fuse stage adapters into one LoRA adapter and, optionally, a merged model.

Output (``RUN/fused/``, written atomically, manifest last)::

    adapter/        one PEFT LoRA adapter: PeftModel.from_pretrained(base, "RUN/fused/adapter")
    merged/         (fuse.merged) a full model in fuse.merged_dtype: AutoModelForCausalLM.from_pretrained
    manifest.json   stage "fuse", the consumed adapters with their sha256, method, weights, checks
    config.yaml

Methods
-------
``cat`` (default) is exact. The PPO policy is base + sft delta + ppo delta (both adapters active,
deltas add), and one LoRA of rank sum(r_i) reproduces that sum: see :func:`cat_lora`. The other
methods (linear, svd, ties, dare_linear, ...) are peft's ``add_weighted_adapter``: approximations.

Why not peft's ``add_weighted_adapter(..., combination_type="cat")``?
--------------------------------------------------------------------
Its arithmetic is right (peft 0.21.2, ``peft/tuners/lora/model.py``): per module it concatenates
``A_i * weight_i * scaling_i`` (rows) and unscaled ``B_i`` (columns), gives the new adapter
``r = lora_alpha = sum(r_i)`` (scaling 1) and leaves zeros where an adapter lacks a module. A quick
try on the tiny NF4 model still missed the stacked adapters by 5 to 9 logits, for reasons around it:

1. The new config is ``replace(peft_config[adapters[0]], r=..., lora_alpha=...)``, so it inherits
   adapter 0's ``lora_dropout``, and the layers it injects are created in train mode even after
   ``model.eval()``: the SFT adapter's dropout ran at inference (off by ~5 logits, different on
   every call). Calling ``eval()`` again brought it to 7.6e-6.
2. It also inherits ``use_rslora``: if adapter 0 used rsLoRA, the new scaling is
   ``r / sqrt(r) = sqrt(r)`` instead of 1 (x2.45 for r=6), in memory and in the saved adapter.
3. Without the bitsandbytes guard (DESIGN.md 8) the first no-grad eval forward repacked the NF4
   weights for the bf16 CPU kernel: stacked and fused then disagreed by 7e-4 even with 1. fixed,
   and both had drifted from the float32 policy.

4. It targets the union of the sources' ``target_modules`` *names* with adapter 0's
   ``layers_to_transform``: with a PPO adapter limited to layer 1, "o_proj" reached layer 0 where
   no source has weights and peft stopped ("No matching LoRAs found"); a layer filter on adapter 0
   would instead silently drop the other adapters' layers.

It also silently does nothing when an adapter of that name exists. :func:`cat_lora` therefore
builds a fresh config (dropout 0, no rsLoRA, the exact module paths) from the saved tensors alone,
needing no model. For the other methods we use peft, work around 4. (:func:`exact_targets`) and
repair 1. and 2. in the saved config.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
from pathlib import Path
from typing import Iterator, Optional

import torch

from pipeline.artifacts.outputs import (
    ArtifactError,
    atomic_output,
    is_complete,
    write_manifest,
)
from pipeline.config import FuseConfig, ModelConfig, PipelineConfig, substitute_run_dir
from pipeline.fusion.lora_state import (
    FuseError,
    Source,
    cat_lora,
    check_stacking,
    delta_rel_error,
    load_lora_state,
    lora_modules,
    read_sources,
    save_lora,
)
from pipeline.models import loading, stacking

CAT = "cat"
LEARNED = "learned"
FUSED = "fused"
PROBE_TEXT = "Tell me a fun fact about the ocean. The quick brown fox jumps over the lazy dog."
# Max |logit| difference allowed between the fused adapter and the stacked adapters (float32 compute).
CAT_TOLERANCE = 1e-3


# ---------------------------------------------------------------------------------------------
# Reading and checking the adapters


# ---------------------------------------------------------------------------------------------
# LoRA tensors


# ---------------------------------------------------------------------------------------------
# Fusing


def fuse_cat(sources: list[Source], weights: list[float], out_dir: Path, base_path: str) -> None:
    """Write the exact concatenation of ``sources`` (see :func:`cat_lora`) to ``out_dir``."""
    config, state = cat_lora([s.config for s in sources], [load_lora_state(s.path) for s in sources], weights,
                             base_path)
    save_lora(out_dir, config, state)


@contextlib.contextmanager
def exact_targets(peft_model, sources: list[Source]) -> Iterator[None]:
    """Temporarily give each source config the exact module paths it holds, and no layer filter,
    so that ``add_weighted_adapter``'s union of targets is exact (finding 4 in the module docstring)."""
    saved = {s.name: peft_model.peft_config[s.name] for s in sources}
    try:
        for s in sources:
            paths = set(lora_modules(load_lora_state(s.path), str(s.path)))
            peft_model.peft_config[s.name] = dataclasses.replace(saved[s.name], target_modules=paths,
                                                                 layers_to_transform=None, layers_pattern=None)
        yield
    finally:
        peft_model.peft_config.update(saved)


def fuse_weighted(peft_model, sources: list[Source], fc: FuseConfig, out_dir: Path, base_path: str) -> None:
    """peft's ``add_weighted_adapter`` over the loaded ``sources``, saved with a repaired config.

    The new adapter's config is copied from the first source; its A/B already carry every scaling,
    so it must have scaling 1: rsLoRA off (peft keeps it, giving sqrt(r)) and no dropout.
    """
    names = [s.name for s in sources]
    if FUSED in peft_model.peft_config:
        raise FuseError(f"an adapter named '{FUSED}' is already loaded; peft would silently keep it")
    density = fc.density if fc.method not in ("linear", "svd") else None
    # dare_* drop entries at random: a fixed seed makes the stage reproducible.
    with torch.random.fork_rng(), exact_targets(peft_model, sources):
        torch.manual_seed(0)
        try:
            peft_model.add_weighted_adapter(names, list(fc.weights), FUSED, combination_type=fc.method,
                                            density=density)
        except ValueError as e:
            raise FuseError(f"fuse.method={fc.method}: {e}") from e
    peft_model.peft_config[FUSED] = dataclasses.replace(
        peft_model.peft_config[FUSED], use_rslora=False, lora_dropout=0.0, base_model_name_or_path=base_path)
    stacking.save_adapter(peft_model, FUSED, out_dir)
    peft_model.delete_adapter(FUSED)


def probe_logits(peft_model, ids: torch.Tensor, adapters: Optional[list[str]]) -> torch.Tensor:
    """float32 logits of ``ids`` with only ``adapters`` active (None: the bare base)."""
    with torch.no_grad(), stacking.active_adapters(peft_model, adapters):
        return peft_model(input_ids=ids).logits.float().cpu()


def check_against_stacked(peft_model, fused_dir: Path, ids: torch.Tensor, stacked: torch.Tensor) -> float:
    """Max |logit| difference between the saved fused adapter and ``stacked`` (the sources' logits)."""
    peft_model.load_adapter(str(fused_dir), adapter_name="fused_check", is_trainable=False)
    peft_model.eval()  # layers injected by load_adapter start in train mode
    fused = probe_logits(peft_model, ids, ["fused_check"])
    peft_model.delete_adapter("fused_check")
    return float((fused - stacked).abs().max())


def merge_full(model_cfg: ModelConfig, adapter_dir: Path, out_dir: Path, dtype: str, ids: torch.Tensor,
               policy_logits: Optional[torch.Tensor]) -> dict:
    """Merge the fused adapter into the dequantized base and save it for plain ``transformers``.

    The base is the NF4 base the adapters were trained on, dequantized to float32 (the issue's
    "base dequantized"), so the merged model reproduces the trained policy up to float round-off;
    both that gap and the merge's own round-off are measured and returned. A base trained without
    4-bit quantization is reloaded in full precision instead.
    """
    from peft import PeftModel

    if model_cfg.load_in_4bit:
        model, tok, _ = loading.load_dequantized_base(model_cfg)
    else:
        model, tok, _ = loading.load_base(dataclasses.replace(model_cfg, compute_dtype="float32"))
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    peft_model.eval()
    ids = ids.to(model.device)
    with torch.no_grad():
        unmerged = peft_model(input_ids=ids).logits.float().cpu()
        merged = peft_model.merge_and_unload(safe_merge=True)
        after = merged(input_ids=ids).logits.float().cpu()
    merged.config.use_cache = True  # load_base turns the KV cache off for training; a released model generates
    merged.to(getattr(torch, dtype))
    merged.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))
    metrics = {"merged_max_abs_logit_diff_vs_unmerged": float((after - unmerged).abs().max())}
    if policy_logits is not None:
        metrics["merged_max_abs_logit_diff_vs_nf4_policy"] = float((after - policy_logits).abs().max())
    return metrics


# ---------------------------------------------------------------------------------------------
# Model card


def model_card(cfg: PipelineConfig, base, sources: list[Source], metrics: dict, kind: str) -> str:
    """README.md for the fused adapter (kind "adapter"), merged model ("merged") or learned fusion ("learned")."""
    fc = cfg.fuse
    learned = fc.method == LEARNED
    title = {"merged": "merged model", "adapter": "fused LoRA adapter", "learned": "learned adapter fusion"}[kind]
    if learned and kind != "learned":
        title += ": the learned fusion's MEAN GATE, an approximation"
    lines = [f"# RLHF policy ({title})", "",
             f"- Base model: `{base.name}` (weights sha256 `{base.weights_sha256[:16]}`, "
             f"tokenizer sha256 `{base.tokenizer_sha256[:16]}`)",
             f"- Stages fused: {', '.join(s.name for s in sources)}",
             f"- Method: `{fc.method}`" + ("" if learned else f", weights {list(fc.weights)}")
             + (f", density {fc.density}" if fc.method not in (CAT, LEARNED, "linear", "svd") else ""),
             ""]
    if learned:
        gates = ", ".join(f"{s.name} {metrics.get(f'mean_gate_{s.name}', math.nan):.3f}" for s in sources)
        kl = metrics.get("kl_per_token_mean_gate_vs_learned", math.nan)
        lines += ["A per-layer, per-token gate `g(x) = K softmax(W x + b)` over the frozen adapters "
                  "(pipeline/fusion/gating.py), trained on reward-ranked samples of the stacked policy and SFT "
                  f"conversations (pipeline/fusion/learned.py). Mean gate per adapter: {gates}. The mean-gate "
                  f"adapter (`adapter/`) is {kl:.4f} nats/token (KL) from the learned fusion.", ""]
    lines += ["## Training stages and data", ""]
    for s in sources:
        m = s.manifest
        stacked = f", trained stacked on {', '.join(m['stacked_on'])}" if m.get("stacked_on") else ""
        lines.append(f"### {s.name} (`{s.path}`, adapter sha256 `{s.sha256[:16]}`{stacked})")
        for key, d in (m.get("data") or {}).items():
            if isinstance(d, dict) and d.get("source"):
                rows = f", {d['rows']} rows" if d.get("rows") is not None else ""
                lines.append(f"- data `{key}`: `{d['source']}` (sha256 `{str(d.get('sha256'))[:16]}`{rows})")
        for key, d in (m.get("adapters") or {}).items():
            lines.append(f"- used `{key}`: `{d.get('path', '')}`")
        headline = {k: v for k, v in (m.get("metrics") or {}).items() if isinstance(v, (int, float))}
        if headline:
            lines.append("- metrics: " + ", ".join(f"{k} = {v:.4g}" for k, v in headline.items()))
        lines.append("")
    lines += ["## Checks", ""] + [f"- {k}: {v:.3g}" for k, v in metrics.items()
                                  if isinstance(v, (int, float))] + ["", "## Loading", ""]
    if kind == "learned":
        lines += ["```python", "from transformers import AutoModelForCausalLM", "from pipeline.fusion import gating",
                  "base_model = AutoModelForCausalLM.from_pretrained(...)  # the base below, quantized as trained",
                  'model = gating.load(base_model, "path/to/fused")  # adapters/ + gate.safetensors',
                  "model.generate(...)", "```", "",
                  f"`base_model` must be `{base.name}`, loaded as the stages were ({json.dumps(base.quantization)}). "
                  "`rlhf eval` puts this folder on its curves when it is RUN/fused (or listed in eval.fused).",
                  "Files: `fusion.json` (adapter order, gated modules), `gate.safetensors` (per module "
                  "`<module>.weight` (K, in) and `.bias` (K), float32), `adapters/<name>/` (the frozen adapters, "
                  "copied byte for byte), `adapter/` (the mean gate folded into one LoRA adapter: an "
                  "approximation), `gate_weights.png` (mean gate by layer), `metrics.jsonl` (training)."]
    elif kind == "merged":
        lines += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  'model = AutoModelForCausalLM.from_pretrained("path/to/fused/merged")',
                  'tokenizer = AutoTokenizer.from_pretrained("path/to/fused/merged")', "```", "",
                  f"Weights: the fused adapter merged into `{base.name}` as the adapters were trained on it "
                  f"(the 4-bit NF4 base, dequantized), saved in {fc.merged_dtype}; it reproduces the trained "
                  "policy up to float round-off (merged_max_abs_logit_diff_vs_nf4_policy under Checks, measured "
                  "when all weights are 1)."]
    else:
        lines += ["```python", "from peft import PeftModel",
                  'model = PeftModel.from_pretrained(base_model, "path/to/fused/adapter")', "```", "",
                  f"`base_model` must be `{base.name}`, loaded as the stages were ({json.dumps(base.quantization)})."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Stage


def fuse_fixed(peft_model, sources: list[Source], fc: FuseConfig, adapter_dir: Path, base_path: str) -> dict:
    """Fuse ``sources`` with fixed weights (``cat`` exactly, the other methods by peft) into ``adapter_dir``;
    returns the fused rank and the relative error of its delta against the weighted sum of the sources'."""
    print(f"[fuse] {fc.method} of {', '.join(s.name for s in sources)} with weights {list(fc.weights)}", flush=True)
    if fc.method == CAT:
        fuse_cat(sources, list(fc.weights), adapter_dir, base_path)
    else:
        fuse_weighted(peft_model, sources, fc, adapter_dir, base_path)
    return {"rank": adapter_rank(adapter_dir),
            "delta_rel_error_vs_weighted_sum": delta_rel_error(sources, list(fc.weights), adapter_dir)}


def adapter_rank(adapter_dir: Path) -> int:
    """The LoRA rank ``r`` a saved adapter's config declares."""
    return json.loads((adapter_dir / "adapter_config.json").read_text())["r"]


def write_cards_and_manifest(tmp: Path, cfg: PipelineConfig, base, sources: list[Source], metrics: dict) -> None:
    """Model cards (adapter/, merged/, and the learned fusion's own) and the manifest, last, into ``tmp``."""
    fc = cfg.fuse
    learned = fc.method == LEARNED
    if fc.merged:
        (tmp / "merged" / "README.md").write_text(model_card(cfg, base, sources, metrics, "merged"))
    (tmp / "adapter" / "README.md").write_text(model_card(cfg, base, sources, metrics, "adapter"))
    if learned:
        (tmp / "README.md").write_text(model_card(cfg, base, sources, metrics, "learned"))
    data = {f"{s.name}:{k}": v for s in sources for k, v in (s.manifest.get("data") or {}).items()}
    consumed = {s.name: {"path": str(s.path), "sha256": s.sha256, "stage": s.manifest.get("stage")}
                for s in sources}
    outputs = (["fusion.json", "gate.safetensors", "adapters"] if learned else []) + ["adapter"] \
        + (["merged"] if fc.merged else [])
    write_manifest(tmp, "fuse", cfg, base, metrics, data=data, adapters=consumed,
                   extra={"method": fc.method, "weights": None if learned else list(fc.weights),
                          "density": fc.density, "outputs": outputs,
                          "merged_dtype": fc.merged_dtype if fc.merged else None})


def run_fuse(cfg: PipelineConfig, run_dir: str | Path, overwrite: bool = False) -> Path:
    """Fuse ``cfg.fuse.adapters`` into ``RUN/fused/adapter`` (and ``merged/``); returns ``RUN/fused``."""
    fc = cfg.fuse
    run_dir = Path(run_dir)
    # 0. where we write: RUN/fused, built in a temporary folder and renamed when complete (manifest last)
    out = run_dir / "fused"
    if is_complete(out) and not overwrite:
        raise ArtifactError(f"{out} already holds a complete output; pass --overwrite to replace it")
    paths = [Path(p) for p in substitute_run_dir(list(fc.adapters), run_dir)]
    learned = fc.method == LEARNED

    # 1. one base, the source adapters stacked on it (checked: same base, stackable)
    # The checks below compare logits of the fused and the stacked adapters: they run in float32 whatever
    # precision the stages trained in, so that a real mismatch is not lost in bf16 rounding (up to 0.05
    # logits on the tiny test model). The adapter files themselves do not depend on the compute dtype.
    # A learned gate trains like any stage, in the configured compute dtype (bf16 on a capable CPU).
    model_cfg = cfg.model if learned else dataclasses.replace(cfg.model, compute_dtype="float32")
    base_model, tok, base = loading.load_base(model_cfg)
    sources = read_sources(paths, base)
    check_stacking(sources)
    peft_model = stacking.stack_adapters(base_model, {s.name: s.path for s in sources})
    peft_model.eval()
    loading.assert_bnb_guarded(peft_model)

    # 2. the stacked adapters' logits on a probe text: what the fused adapter must reproduce
    ids = tok(PROBE_TEXT, return_tensors="pt").input_ids.to(base_model.device)
    all_ones = all(w == 1.0 for w in fc.weights) and not learned
    policy_logits = probe_logits(peft_model, ids, [s.name for s in sources]) if all_ones or learned else None

    with atomic_output(out, overwrite=overwrite) as tmp:
        # 3. fuse: train the learned gate, or combine the adapters with fixed weights
        adapter_dir = tmp / "adapter"
        if learned:
            from pipeline.fusion.learned import train_learned

            metrics = train_learned(cfg, run_dir, sources, peft_model, tok, base, tmp, ids, policy_logits)
            metrics["rank"] = adapter_rank(adapter_dir)
            policy_logits = None  # the merged model below is the mean-gate approximation, not the policy
        else:
            metrics = fuse_fixed(peft_model, sources, fc, adapter_dir, base.path)

        # 4. check: with all weights 1, the fused adapter against the stacked ones (cat within CAT_TOLERANCE)
        if all_ones:
            diff = check_against_stacked(peft_model, adapter_dir, ids, policy_logits)
            metrics["max_abs_logit_diff_vs_stacked"] = diff
            if fc.method == CAT and diff > CAT_TOLERANCE:
                raise FuseError(f"the fused adapter differs from the stacked adapters by {diff:.3g} logits "
                                f"(> {CAT_TOLERANCE})")

        # 5. free the NF4 model; the merged model (fuse.merged) on a freshly loaded dequantized base
        del peft_model, base_model
        gc.collect()  # the PeftModel holds reference cycles: free it before the merge loads a float32 base
        loading.release_free_memory()
        if fc.merged:
            metrics.update(merge_full(cfg.model, adapter_dir, tmp / "merged", fc.merged_dtype, ids.cpu(),
                                      policy_logits))

        # 6. model cards, manifest (last)
        write_cards_and_manifest(tmp, cfg, base, sources, metrics)
    for k, v in metrics.items():
        if isinstance(v, (int, float)):
            print(f"[fuse] {k}: {v:.3g}", flush=True)
    print(f"[fuse] done -> {out}", flush=True)
    return out
