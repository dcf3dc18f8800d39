"""Every `generate` call in the project: prompts encoded and fitted, stop tokens, Gumbel-max sampling, decoding.

Prompts are left-padded; responses are right-padded after the first stop token. Position ids are
derived from the attention mask so a row's logits do not depend on how much left padding it has.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from pipeline.data import lengths
from pipeline.models import loading
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


class GumbelMaxSampler:
    """A logits processor that turns greedy decoding into sampling from softmax(logits / T).

    Gumbel-max trick: argmax_i(l_i / T + g_i) with g_i = -log(-log U_i), U_i ~ U(0, 1) independent,
    is distributed as softmax(l / T) (Gumbel 1954; Maddison et al. 2014, "A* Sampling", section 2).
    ``torch.multinomial``, which ``generate(do_sample=True)`` uses, spent 7.3 ms per decode step on
    8 x 49152 probabilities on this CPU (0.24 s of a 32-token rollout); the noise costs ~1 ms. Noise
    is drawn from the global torch RNG, so ``torch.manual_seed`` makes sampling reproducible.
    """

    def __init__(self, temperature: float):
        self.temperature = temperature

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        u = torch.rand(scores.shape, dtype=torch.float32, device=scores.device)
        # u == 0 gives -inf noise (never chosen), which is the right limit.
        return scores.float() / self.temperature - torch.log(-torch.log(u))


@torch.no_grad()
def generate(model, tokenizer, query_ids: torch.Tensor, query_mask: torch.Tensor, max_new_tokens: int,
             temperature: float, stop_ids: Optional[list[int]] = None, generator_seed: Optional[int] = None):
    """Sample responses with plain temperature sampling (no top-k, top-p or repetition penalty) so
    that sampling and scoring (logits / temperature) describe the same distribution (DESIGN.md 4.4).

    Returns ``(response_ids (B, T), response_mask (B, T) float, ended (B,) bool)``: tokens after the
    first stop token are replaced by pad and masked out; the stop token itself is kept.
    """
    from transformers import GenerationConfig, LogitsProcessorList

    stop_ids = stop_ids or stop_token_ids(tokenizer, model)
    # Greedy over Gumbel-perturbed logits == sampling (GumbelMaxSampler). Every processor a model's own
    # generation_config could add is set off explicitly: unset fields are filled from it.
    gen_cfg = GenerationConfig(do_sample=False, num_beams=1, repetition_penalty=1.0, no_repeat_ngram_size=0,
                               max_new_tokens=max_new_tokens, eos_token_id=stop_ids,
                               pad_token_id=tokenizer.pad_token_id, use_cache=True)
    device = next(model.parameters()).device
    # A per-call seed samples reproducibly without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [],
                               enabled=generator_seed is not None), loading.compute_context(model):
        if generator_seed is not None:
            torch.manual_seed(generator_seed)
        out = model.generate(input_ids=query_ids.to(device), attention_mask=query_mask.to(device),
                             generation_config=gen_cfg,
                             logits_processor=LogitsProcessorList([GumbelMaxSampler(temperature)]))
    response = out[:, query_ids.shape[1]:].cpu()
    if response.shape[1] == 0:
        response = torch.full((query_ids.shape[0], 1), tokenizer.pad_token_id, dtype=torch.long)
    return ppo_math.first_stop_truncate(response, stop_ids, tokenizer.pad_token_id)


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
