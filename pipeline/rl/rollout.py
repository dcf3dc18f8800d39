"""Every `generate` call in the project: prompts encoded and fitted, stop tokens, temperature sampling, decoding.

Prompts are left-padded; responses are right-padded after the first stop token. Position ids are
derived from the attention mask so a row's logits do not depend on how much left padding it has.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from pipeline.data import lengths
from pipeline.models import forwards, loading, trunk
from pipeline.models.forwards import left_pad
from pipeline.rl import ppo_math


class PromptTooLongError(ValueError):
    pass


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a prompt under the chat template, with the generation prompt."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    if hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def encode_prompts(tokenizer, prompts: Sequence[list[dict]], max_prompt_length: int) -> list[list[int]]:
    """Apply the chat template (with the generation prompt) and check each prompt fits."""
    out = []
    for i, messages in enumerate(prompts):
        ids = prompt_ids(tokenizer, messages)
        if len(ids) > max_prompt_length:
            raise PromptTooLongError(
                f"prompt {i} is {len(ids)} tokens, longer than max_prompt_length={max_prompt_length}: "
                f"{messages[-1]['content'][:80]!r}")
        out.append(ids)
    return out


def fit_prompts(tokenizer, rows: list[dict], report, max_prompt_length: int, long_rows: str,
                what: str) -> tuple[list[dict], list[list[int]], "lengths.LengthReport"]:
    """Prompt rows (``{"prompt": messages}``, as loaded with ``report``) encoded and fitted to
    ``max_prompt_length`` by ``data.long_rows``: ``(kept rows, their ids, LengthReport)``. ``report`` None
    (rows not read from a file: none, or built in code) names rows by their 1-based index."""
    row_name = report.row_name if report is not None else (lambda i: f"row {i + 1}")
    kept, ids, fitted = lengths.fit_prompt_ids([prompt_ids(tokenizer, r["prompt"]) for r in rows], max_prompt_length,
                                               long_rows, what, "ppo.max_prompt_length", row_name)
    return [rows[i] for i in kept], ids, fitted


def stop_token_ids(tokenizer, model=None) -> list[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(int(i) for i in gen_eos)
    return sorted(ids)


class TemperatureSampler:
    """A logits processor that turns greedy decoding into sampling from softmax(logits / T): it returns
    0 at the drawn token and -inf elsewhere, so the greedy argmax picks it.

    Inverse-CDF sampling, one uniform per row, in two levels: the row's unnormalised probabilities
    w = exp((l - max) / T) are summed in blocks of :data:`CDF_BLOCK` tokens, the block is found on the
    float64 cumulative sum of the block sums, and the token on the float64 cumulative sum inside that
    block (:func:`inverse_cdf`); tokens of probability 0 are never drawn. ``torch.multinomial``, which
    ``generate(do_sample=True)`` uses, spent 7.3 ms per decode step on 8 x 49152 probabilities on a
    2-core CPU; the Gumbel-max trick (a uniform and two logs per vocabulary entry) ~110 ms per step on
    128 x 49152; a float64 cumulative sum over the whole vocabulary ~100 ms (torch.profiler, AMD EPYC
    under the AVX2 caps). This makes a handful of float32 passes over the vocabulary, all into one
    buffer the sampler keeps: on CPU a fresh (rows x vocabulary) tensor per decode step is page-faulted
    in again each time. Noise is drawn from the global torch RNG, so ``torch.manual_seed`` makes
    sampling reproducible.

    The returned tensor is that buffer: valid until the next call. ``scores`` is not modified.
    With ``record``, it also keeps per step the log-probability under softmax(logits / T) of the token it
    drew: ``logprobs`` (B, steps).
    """

    def __init__(self, temperature: float, record: bool = False):
        self.temperature = temperature
        self.record = record
        self.steps: list[torch.Tensor] = []
        self._buf: Optional[torch.Tensor] = None

    def __call__(self, input_ids: Optional[torch.Tensor], scores: torch.Tensor) -> torch.Tensor:
        u = torch.rand((scores.shape[0], 1), dtype=torch.float64, device=scores.device)
        pick, logprob = self.draw(scores, u)
        if logprob is not None:
            self.steps.append(logprob)
        return self._buf[:scores.shape[0]].fill_(-math.inf).scatter_(-1, pick, 0.0)

    def draw(self, scores: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The token drawn from softmax(``scores`` / T) (B, V) with uniforms ``u`` (B, 1) float64: ``(pick
        (B, 1), its log-probability (B,) with ``record``, else None)``."""
        b, v = scores.shape
        # rows of the buffer kept when a batch shrinks (a decode batch drops its finished rows)
        if self._buf is None or self._buf.shape[0] < b or self._buf.shape[1] != v or self._buf.device != scores.device:
            self._buf = torch.empty((b, v), dtype=torch.float32, device=scores.device)
        w = self._buf[:b]
        top = scores.amax(dim=-1, keepdim=True).float()
        torch.sub(scores, top, out=w)
        w.mul_(1.0 / self.temperature).exp_()
        pick, total = inverse_cdf(w, u)
        # log w[pick] = (l - max) / T at the draw, to exp/log round-off (~1e-7); w[pick] > 0 (drawn)
        logprob = (w.gather(-1, pick).log() - total.log().float()).squeeze(-1) if self.record else None
        return pick, logprob

    @property
    def logprobs(self) -> torch.Tensor:
        return torch.stack(self.steps, dim=1) if self.steps else torch.zeros((0, 0))


# Tokens per block of the two-level inverse CDF: 192 blocks on a 49k vocabulary, so both cumulative sums
# are short; any size gives the same distribution.
CDF_BLOCK = 256


def inverse_cdf(weights: torch.Tensor, u: torch.Tensor, block: int = CDF_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """The first index whose cumulative weight exceeds ``u`` x the row's total, per row, without a
    cumulative sum over the whole row.

    Args:
        weights: ``(B, V)`` float32, >= 0, each row with a positive total.
        u: ``(B, 1)`` float64 uniforms in [0, 1).
    Returns:
        ``(pick (B, 1) long, total (B, 1) float64)``: the drawn index, P(pick = v) = w_v / sum(w), and the
        row's total. An index of weight 0 is never returned, even where rounding puts ``u`` x total at
        or past the last cumulative sum.

    Blocks of ``block`` entries are summed (float32 sums, float64 cumulative sum across blocks); the block
    holding ``u`` x total is found, and the index inside it on that block's float64 cumulative sum, with the
    remainder rescaled to that sum (it and the block's float32 sum differ by float32 round-off). E.g.
    w = (1, 0, 3, 4), block 2, u = 0.5: block sums (1, 7), cumulative (1, 8), target 4 -> block 1 (1 <= 4 < 8);
    remainder 3 of 7, inside cumulative (3, 7) -> index 1 of the block (3 <= 3 < 7): token 3.
    """
    b, v = weights.shape
    full = v // block
    parts = [weights[:, :full * block].view(b, full, block).sum(-1)] if full else []
    if v > full * block:
        parts.append(weights[:, full * block:].sum(-1, keepdim=True))
    sums = torch.cat(parts, dim=1).double() if len(parts) > 1 else parts[0].double()
    cdf = sums.cumsum(-1)
    total = cdf[:, -1:]
    target = u * total
    # the first block whose cumulative sum passes the target, at most the last block with any weight
    blk = torch.minimum(torch.searchsorted(cdf, target, right=True), (cdf < total).sum(-1, keepdim=True))
    start = blk * block
    idx = (start + torch.arange(block, device=weights.device)).clamp_(max=v - 1)
    inner = weights.gather(-1, idx).double()
    inner[(start + torch.arange(block, device=weights.device)) >= v] = 0.0
    inner = inner.cumsum(-1)
    inner_total = inner[:, -1:]
    before = torch.where(blk > 0, cdf.gather(-1, (blk - 1).clamp(min=0)), torch.zeros_like(target))
    rest = (target - before) / sums.gather(-1, blk) * inner_total
    at = torch.minimum(torch.searchsorted(inner, rest, right=True), (inner < inner_total).sum(-1, keepdim=True))
    return start + at, total


@dataclass
class Sampled:
    """One batch of sampled responses (:func:`sample`): ``response`` (B, T) long, right-padded after the
    first stop token; ``mask`` (B, T) True up to and including it; ``ended`` (B,) whether a stop token
    came; ``logprobs`` (B, T) float32, each token's log-probability under softmax(logits / T) of the
    model as it sampled (0 past the mask), or None when not asked for; ``trunk``, what the layers below
    ``trunk_split`` computed while sampling (None when not asked for, or where the sampler could not keep it)."""
    response: torch.Tensor
    mask: torch.Tensor
    ended: torch.Tensor
    logprobs: Optional[torch.Tensor] = None
    trunk: Optional[trunk.SampledTrunk] = None


@torch.no_grad()
def sample(model, tokenizer, query_ids: torch.Tensor, query_mask: torch.Tensor, max_new_tokens: int,
           temperature: float, stop_ids: Optional[list[int]] = None, generator_seed: Optional[int] = None,
           with_logprobs: bool = False, trunk_split: int = 0) -> Sampled:
    """Sample responses with plain temperature sampling (no top-k, top-p or repetition penalty) so
    that sampling and scoring (logits / temperature) describe the same distribution (DESIGN.md 4.4).
    Tokens after the first stop token are replaced by pad and masked out; the stop token itself is kept.

    ``with_logprobs`` keeps each sampled token's log-probability from the logits the sampler drew it
    from (one gather and log-sum-exp per decode step, no extra forward). They equal
    :func:`pipeline.models.forwards.forward_response` over the same rows to float round-off (tested),
    in the precision the model samples in: from merged weights they are the merged model's.

    ``trunk_split`` > 0 also keeps what decoder layer ``trunk_split - 1`` returned on the rows
    (:class:`pipeline.models.trunk.SampledTrunk`): a model that agrees with the sampler below that layer
    (eval's SFT reference of a policy with LoRA on the top layers) then scores the rows running only the
    layers above it (:func:`pipeline.models.trunk.sampled_response_hidden`).
    """
    from transformers import GenerationConfig, LogitsProcessorList

    stop_ids = stop_ids or stop_token_ids(tokenizer, model)
    # Greedy over the sampler's output == sampling (TemperatureSampler). Every processor a model's own
    # generation_config could add is set off explicitly: unset fields are filled from it.
    gen_cfg = GenerationConfig(do_sample=False, num_beams=1, repetition_penalty=1.0, no_repeat_ngram_size=0,
                               max_new_tokens=max_new_tokens, eos_token_id=stop_ids,
                               pad_token_id=tokenizer.pad_token_id, use_cache=True)
    device = next(model.parameters()).device
    sampler = TemperatureSampler(temperature, record=with_logprobs)
    # A per-call seed samples reproducibly without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [],
                               enabled=generator_seed is not None), loading.compute_context(model), \
            loading.decode_attention(model):
        if generator_seed is not None:
            torch.manual_seed(generator_seed)
        tap = trunk.StateTap(model, trunk_split) if trunk_split > 0 else None
        with tap or contextlib.nullcontext():
            ids, mask, cache = shared_prefix_prefill(model, query_ids.to(device), query_mask.to(device),
                                                     tokenizer.pad_token_id)
            top = tap.take_prefill() if tap is not None else None
            drawn_logprobs, sampled_trunk = None, None
            if cache is not None:
                # a plain key/value cache (prefill_prompts gives no other): rows can leave the batch
                cached = cache.get_seq_length()
                # the shared start's keys and values below the split, before the decode grows and cuts the cache
                below = cache.layers[:trunk_split] if top is not None else []
                kv = [(layer.keys[:1, :, :cached], layer.values[:1, :, :cached]) for layer in below]
                response, drawn_logprobs = decode(model, ids, mask, cache, max_new_tokens, sampler, stop_ids,
                                                  tokenizer.pad_token_id, tap=tap)
                states = tap.states() if tap is not None else None
                if states is not None:
                    sampled_trunk = trunk.SampledTrunk(trunk_split, mask, cached, states, top, kv)
            else:
                out = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache,
                                     generation_config=gen_cfg, logits_processor=LogitsProcessorList([sampler]))
                response = out[:, ids.shape[1]:]
    response = response.cpu()
    if response.shape[1] == 0:
        response = torch.full((query_ids.shape[0], 1), tokenizer.pad_token_id, dtype=torch.long)
    response, mask, ended = ppo_math.first_stop_truncate(response, stop_ids, tokenizer.pad_token_id)
    logprobs = None
    if with_logprobs:
        logprobs = torch.zeros(response.shape, dtype=torch.float32)
        steps = (drawn_logprobs if drawn_logprobs is not None else sampler.logprobs).cpu()
        logprobs[:, :steps.shape[1]] = steps[:, :response.shape[1]]
        logprobs = logprobs * mask
    return Sampled(response, mask, ended, logprobs, sampled_trunk)


# A decode batch drops its finished rows, and their rows of the cache, once they are at least this share of
# it: each drop copies the whole cache (index_select per layer), and a dropped row saves its share of every
# later step. Sampling 128 eval rows from the default's SFT adapter (mean response 26 of 32 tokens): 0.85x
# generate's time with the same tokens, at 8-9 drops per batch (float32, AMD EPYC under the AVX2 caps;
# 1/25 and 1/4 measured 0.87x and 0.91x).
DROP_FINISHED = 1 / 16


def decode(model, ids: torch.Tensor, mask: torch.Tensor, cache, max_new_tokens: int, sampler: "TemperatureSampler",
           stop_ids: list[int], pad_id: int,
           tap: Optional[trunk.StateTap] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``generate``'s sampling loop over left-padded ``ids`` (B, P) (``mask``), continuing from ``cache``, a
    plain key/value cache of their first columns (:func:`pipeline.models.forwards.prefill_prompts`), with
    ``sampler`` drawing each token: ``(response (B, steps), logprobs (B, steps) with sampler.record, else
    None)``, tokens after a row's stop token ``pad_id``. Unlike ``generate``, rows that have stopped leave
    the batch (:data:`DROP_FINISHED`): the rest run without them. Every step draws one uniform for each of
    the B rows, finished or not, as ``generate`` does, so the tokens drawn from a seed are ``generate``'s
    (to float round-off in the forwards over fewer rows). ``tap`` (entered) is told which rows each forward ran."""
    b, p = ids.shape
    device = ids.device
    cached = cache.get_seq_length()
    attention = torch.ones((b, p + max_new_tokens), dtype=mask.dtype, device=device)
    attention[:, :p] = mask
    position = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
    # only the last column's logits are needed, where the family's forward can skip the others
    last_only = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
    logits = model(input_ids=ids[:, cached:], attention_mask=attention[:, :p], position_ids=position[:, cached:],
                   past_key_values=cache, use_cache=True, **last_only).logits[:, -1]
    if tap is not None:
        tap.take_prompt()
    position = position[:, -1:] + 1
    response = torch.full((b, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((b, max_new_tokens), dtype=torch.float32, device=device) if sampler.record else None
    rows = torch.arange(b, device=device)  # each batch row's row of the output
    live = torch.ones(b, dtype=torch.bool, device=device)
    stop = torch.tensor(stop_ids, dtype=torch.long, device=device)
    steps = 0
    for t in range(max_new_tokens):
        u = torch.rand((b, 1), dtype=torch.float64, device=device)[rows]
        pick, logprob = sampler.draw(logits.float(), u)  # float32 logits, as generate gives its processors
        pick = pick.squeeze(1).masked_fill(~live, pad_id)
        response[rows, t] = pick
        if logprob is not None:
            logprobs[rows, t] = logprob
        live &= ~torch.isin(pick, stop)
        steps, left = t + 1, int(live.sum())
        if left == 0 or steps == max_new_tokens:
            break
        if len(live) - left >= DROP_FINISHED * len(live):
            kept = live.nonzero().squeeze(1)
            forwards.select_cache_rows(cache.layers, kept)
            rows, live, attention, position, pick = (x[kept] for x in (rows, live, attention, position, pick))
        logits = model(input_ids=pick.unsqueeze(1), attention_mask=attention[:, :p + steps], position_ids=position,
                       past_key_values=cache, use_cache=True, **last_only).logits[:, -1]
        if tap is not None:
            tap.take_step(rows)
        position = position + 1
    return response[:, :steps], logprobs[:, :steps] if logprobs is not None else None


def accepts_logits_to_keep(model) -> bool:
    """Whether the causal LM under ``model`` (plain or in peft) takes ``logits_to_keep`` (most families of
    transformers 4.50 on; ``generate`` checks its signature the same way)."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def shared_prefix_prefill(model, query_ids: torch.Tensor, query_mask: torch.Tensor, pad_id: int):
    """:func:`pipeline.models.forwards.prefill_prompts` for ``generate`` to continue from: the system
    prompt every row starts with, and each distinct prompt however many rows sample it, run once."""
    return forwards.prefill_prompts(model, query_ids, query_mask, pad_id)


def generate(model, tokenizer, query_ids: torch.Tensor, query_mask: torch.Tensor, max_new_tokens: int,
             temperature: float, stop_ids: Optional[list[int]] = None, generator_seed: Optional[int] = None):
    """:func:`sample` without log-probabilities, as ``(response_ids (B, T), response_mask (B, T),
    ended (B,))``."""
    s = sample(model, tokenizer, query_ids, query_mask, max_new_tokens, temperature, stop_ids, generator_seed)
    return s.response, s.mask, s.ended


def sample_texts(model, tokenizer, prompts: Sequence[list[dict]], max_new_tokens: int, temperature: float,
                 batch_size: int = 8, max_prompt_length: int = 512, progress: Optional[str] = None) -> list[str]:
    """Sample one response per prompt (chat-formatted message lists); returns decoded texts. A prompt
    over ``max_prompt_length`` tokens keeps its last ones (data.long_rows=truncate; callers that drop
    or refuse long prompts do so first, with ``fit_prompts``)."""
    from tqdm.auto import tqdm

    texts: list[str] = []
    encoded = [prompt_ids(tokenizer, p)[-max_prompt_length:] for p in prompts]
    starts = range(0, len(encoded), batch_size)
    for s in tqdm(starts, desc=progress, disable=progress is None):
        q, qm = left_pad(encoded[s:s + batch_size], tokenizer.pad_token_id)
        resp, mask, _ = generate(model, tokenizer, q, qm, max_new_tokens, temperature)
        texts.extend(decode_responses(tokenizer, resp, mask))
    return texts


def decode_responses(tokenizer, response_ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    return [tokenizer.decode(r[m.bool()].tolist(), skip_special_tokens=True).strip()
            for r, m in zip(response_ids, mask)]
