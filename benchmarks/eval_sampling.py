"""Eval's sampling of one model (32 eval prompts x 4 samples, 32 new tokens) by the changes of
2026-12-05, each variant adding one to the one before, against the code before them, measured in one
process, variants alternating:

- ``before``: the Gumbel-max sampler (a uniform and two logs per vocabulary entry), every row prefilling
  its whole prompt, four calls of 32 rows (``eval.batch_size: 32``), eager attention;
- ``+sampler``: inverse-CDF sampling on one float64 cumulative sum over the vocabulary, fresh tensors
  each step (the sampler of ``3e344a3``);
- ``+shared``: the system prompt all rows start with prefilled once per call
  (``rollout.shared_prefix_prefill``);
- ``+rows128``: one call of 128 rows (``eval.batch_size: 128``);
- ``+buffer``: today's ``rollout.TemperatureSampler`` (two-level inverse CDF into one kept buffer);
- ``+sdpa``: sdpa attention while decoding (``loading.decode_attention``);
- ``+per-prompt``: each distinct prompt's rest prefilled once for its 4 rows, not once per row
  (``rollout.shared_prefix_prefill``), today's code.

The embedded model, compute dtype ``auto``, a random LoRA policy (r 8) merged into dense weights as
eval samples (``ppo.rollout_weights: auto``). Prints each variant's mean with its standard error over
``--repeats`` and its ratio to ``before``.

    python benchmarks/eval_sampling.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from pipeline.config import LoraConfigSection, PipelineConfig
from pipeline.data import loaders
from pipeline.evaluation.stats import mean_se
from pipeline.models import forwards, loading, stacking, throughput
from pipeline.rl import rollout


class GumbelMaxSampler:
    """The sampler before 2026-12-05: argmax(l / T - log(-log U)), U uniform per vocabulary entry."""

    def __init__(self, temperature: float, record: bool = False):
        self.temperature = temperature

    def __call__(self, input_ids, scores: torch.Tensor) -> torch.Tensor:
        u = torch.rand(scores.shape, dtype=torch.float32, device=scores.device)
        return scores.float() / self.temperature - torch.log(-torch.log(u))


class OneCumsumSampler:
    """The sampler of 3e344a3: the first token whose float64 cumulative sum over the whole vocabulary
    passes u x total, into fresh tensors each step."""

    def __init__(self, temperature: float, record: bool = False):
        self.temperature = temperature

    def __call__(self, input_ids, scores: torch.Tensor) -> torch.Tensor:
        scaled = scores.float() / self.temperature
        weights = (scaled - scaled.amax(dim=-1, keepdim=True)).exp_()
        cdf = weights.cumsum(dim=-1, dtype=torch.float64)
        u = torch.rand((scores.shape[0], 1), dtype=torch.float64, device=scores.device) * cdf[:, -1:]
        pick = torch.searchsorted(cdf, u, right=True).clamp_(max=scores.shape[-1] - 1)
        return torch.full_like(scaled, -math.inf).scatter_(-1, pick, 0.0)


def system_prompt_prefill(model, query_ids, query_mask, pad_id):
    """The prefill before 2026-12-05 evening: only the start all rows share (the system prompt) runs once;
    every row then prefills its own rest, however many rows repeat its prompt."""
    real = query_mask.long().sum(dim=1)
    if query_ids.shape[0] < 2 or not forwards.SHARE_PREFIXES:
        return query_ids, query_mask, None
    shared = forwards.common_prefix_length(query_ids, real, int(real.min()) - 1)
    if shared == 0:
        return query_ids, query_mask, None
    top, rest, rest_mask = forwards.split_shared(query_ids, query_mask, shared, pad_id)
    # the system prompt alone cached; every row's rest is left for generate's prefill
    _, cache = forwards.cache_prefixes(forwards.backbone(model), top, rest[:, :0], rest_mask[:, :0])
    b = query_ids.shape[0]
    return (torch.cat([top.expand(b, -1), rest], dim=1),
            torch.cat([torch.ones((b, shared), dtype=torch.long), rest_mask], dim=1), cache)


PREFILL = rollout.shared_prefix_prefill
VARIANTS = {  # name: (sampler, share prefixes, rows per call, sdpa while decoding, prefill)
    "before": (GumbelMaxSampler, False, 32, False, system_prompt_prefill),
    "+sampler": (OneCumsumSampler, False, 32, False, system_prompt_prefill),
    "+shared": (OneCumsumSampler, True, 32, False, system_prompt_prefill),
    "+rows128": (OneCumsumSampler, True, 128, False, system_prompt_prefill),
    "+buffer": (rollout.TemperatureSampler, True, 128, False, system_prompt_prefill),
    "+sdpa": (rollout.TemperatureSampler, True, 128, True, system_prompt_prefill),
    "+per-prompt": (rollout.TemperatureSampler, True, 128, True, PREFILL),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from peft import get_peft_model

    cfg = PipelineConfig()
    model, tok, _ = loading.load_base(cfg.model)
    pm = get_peft_model(model, loading.lora_config(LoraConfigSection(r=8, alpha=16, dropout=0.0), model=model))
    pm.eval()
    prompts, report = loaders.load_prompts(cfg.data.prompts_eval, **loaders.loader_options(cfg.data))
    _, encoded, _ = rollout.fit_prompts(tok, prompts[:32], report, cfg.ppo.max_prompt_length, cfg.data.long_rows,
                                        "eval prompts")
    rows = [e for e in encoded for _ in range(4)]
    stop = rollout.stop_token_ids(tok, model)
    print(f"{throughput.cpu_description()['cpu']}, {torch.get_num_threads()} threads, "
          f"{loading.describe_precision(cfg.model, torch.device('cpu'))}; {len(rows)} rows, prompts of "
          f"{min(map(len, encoded))}-{max(map(len, encoded))} tokens", flush=True)
    real_sampler, real_share = rollout.TemperatureSampler, forwards.SHARE_PREFIXES
    decode_attn = vars(model).get("_rlhf_decode_attn")
    if decode_attn is None:
        print("note: this load does not switch attention while decoding (model.attn_implementation is not "
              "'auto' or the device is not a CPU): +sdpa equals +buffer", flush=True)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    try:
        with torch.no_grad(), stacking.merged_linear_weights(pm):
            for rep in range(args.repeats + 1):  # the first round warms up
                for name, (sampler, share, per_call, sdpa, prefill) in VARIANTS.items():
                    rollout.TemperatureSampler, forwards.SHARE_PREFIXES = sampler, share
                    rollout.shared_prefix_prefill = prefill
                    model._rlhf_decode_attn = decode_attn if sdpa else None
                    t = time.perf_counter()
                    for b, s in enumerate(range(0, len(rows), per_call)):
                        q, qm = forwards.left_pad(rows[s:s + per_call], tok.pad_token_id)
                        rollout.sample(pm, tok, q, qm, 32, 0.7, stop, generator_seed=rep * 100 + b)
                    if rep:
                        times[name].append(time.perf_counter() - t)
                        print(f"repeat {rep}: {name} {times[name][-1]:.2f} s", flush=True)
    finally:
        rollout.TemperatureSampler, forwards.SHARE_PREFIXES = real_sampler, real_share
        rollout.shared_prefix_prefill = PREFILL
        model._rlhf_decode_attn = decode_attn
    for name, xs in times.items():
        m, se = mean_se(xs)
        ratios = [x / y for x, y in zip(xs, times["before"])]
        r, r_se = mean_se(ratios)
        print(f"RESULT variant={name} seconds={m:.2f}±{se:.2f} vs_before={r:.3f}±{r_se:.3f}")


if __name__ == "__main__":
    main()
