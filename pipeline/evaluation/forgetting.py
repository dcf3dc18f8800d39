"""The forgetting check (``eval.forgetting``): how far each model moved away from the base on general
text that no stage trained on.

For every model, on a held-out set of general passages (``data/general_text.jsonl`` by default):

- the mean token loss (negative log-likelihood, nats per token) and its perplexity ``exp(loss)``;
- the mean per-token ``KL(model || base)`` over the full vocabulary, at every position of the same text.

Loss says whether the model still predicts ordinary text as well as the base did (forgetting shows as
a rise); the KL says how much its next-token distributions moved at all, in either direction, and is
0 exactly for the base itself. Both are token-weighted means over every scored token of the set.
Measuring forgetting as the loss on text outside the fine-tuning domain follows Biderman et al. 2024,
"LoRA Learns Less and Forgets Less" (arXiv 2405.09673).

Each passage is tokenized as the tokenizer does by default (SmolLM2's adds no special tokens), cut to
its first ``max_tokens`` tokens, and every token after the first is scored given the ones before it.
No generation: one batched forward per model. The base is the same in-memory model with every adapter
off; its final hidden states are kept (tokens x hidden, small) and each model's logits and the base's
are made from them chunk by chunk, so no (tokens x vocabulary) tensor is ever held whole.
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from pipeline.data import loaders
from pipeline.models import forwards, loading, stacking, trunk

# Columns this check adds to curves.csv and to every eval point (None where it does not apply).
COLUMNS = ("general_nll", "general_ppl", "general_kl_to_base")
# Positions whose logits are made at once: about four (chunk x vocabulary) float32 tensors alive, ~0.1 GB
# at 128 positions on a 49k vocabulary. 256 was no faster on the embedded model (0.77-0.82 vs 0.81-0.86
# ms per token for both heads and the KL, one thread).
CHUNK = 128
# Passages per forward (at most eval.batch_size). Batches are cut from passages sorted by length, so
# smaller ones pad less: the default's 48 passages (51-84 tokens) in one batch of 48 were 76% real
# tokens, and a model's check took 9.8-10.1 s against 8.3-8.7 s in batches of 16 (three processes,
# three repeats each; float32, AMD EPYC under the AVX2 caps).
BATCH = 16
# The base's log-probabilities at every scored position are kept across models when they take at most this
# much memory (float32): each model then costs its own forward, head and log-softmax, not the base's head
# and log-softmax again. The default's 3,003 tokens x 49,152 take 590 MB and saved 1.5 s of a model's ~9.5 s
# (AMD EPYC under the AVX2 caps); a larger set or vocabulary recomputes them chunk by chunk.
BASE_LOGPROBS_MAX_BYTES = 1 << 30


# ---------------------------------------------------------------------------------------------
# Pure math


def token_nll_and_kl(logits: torch.Tensor, base_logits: torch.Tensor,
                     targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position loss of the target token and the exact ``KL(p || q)`` over the vocabulary.

    Args:
        logits: ``(N, V)`` the model's logits at N positions (any float dtype; computed in float32).
        base_logits: ``(N, V)`` the base's logits at the same positions.
        targets: ``(N,)`` the token that follows each position.

    Returns:
        ``(nll, kl)``, each ``(N,)`` float32: ``nll = -log p(target)`` and
        ``kl = sum_v p_v (log p_v - log q_v)`` with ``p = softmax(logits)``, ``q = softmax(base_logits)``.
        Equal logits give a KL of exactly 0 (``log p - log q`` is 0 term by term).
    """
    if logits.shape != base_logits.shape or logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"expected logits and base_logits (N, V) and targets (N,), got {tuple(logits.shape)}, "
                         f"{tuple(base_logits.shape)} and {tuple(targets.shape)}")
    return nll_and_kl(logits, F.log_softmax(base_logits, dim=-1, dtype=torch.float32), targets)


def nll_and_kl(logits: torch.Tensor, base_logprobs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`token_nll_and_kl` given the base's log-probabilities ``log q`` (N, V) float32 (its
    ``log_softmax``) instead of its logits, for a base whose log-probabilities are kept across models."""
    logp = F.log_softmax(logits, dim=-1, dtype=torch.float32)
    nll = -logp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    p = logp.exp()
    # in place: three (N, V) float32 tensors alive at the peak instead of five
    kl = torch.linalg.vecdot(p, logp.sub_(base_logprobs))
    return nll, kl


def summarize(nll_sums: Sequence[float], kl_sums: Sequence[float], tokens: Sequence[int]) -> dict:
    """Token-weighted means over passages: ``{"nll", "ppl", "kl", "tokens", "passages"}``.

    ``nll = sum(nll_sums) / sum(tokens)`` nats per token, ``ppl = exp(nll)``, ``kl = sum(kl_sums) /
    sum(tokens)``. Passages of 1 and 3 scored tokens with loss sums 2 and 4: (2 + 4) / 4 = 1.5 nats,
    perplexity e^1.5 = 4.48 (a per-passage average would say (2/1 + 4/3) / 2 = 1.67).
    """
    n = sum(int(t) for t in tokens)
    if n <= 0:
        raise ValueError("no scored tokens")
    nll = math.fsum(nll_sums) / n
    return {"nll": nll, "ppl": math.exp(nll), "kl": math.fsum(kl_sums) / n, "tokens": n, "passages": len(tokens)}


# ---------------------------------------------------------------------------------------------
# The text


@dataclass
class GeneralText:
    """Passages tokenized and batched (right-padded), longest first."""

    source: str
    batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # (ids, mask, passage index), (B, T), (B,)
    passages: int
    tokens: int  # scored tokens: each passage's length - 1
    truncated: int  # passages cut to max_tokens


def read_passages(source: str, key: str = "eval.forgetting") -> list[str]:
    """The ``text`` of every row of ``source`` (jsonl, json, csv, parquet or a hub id). A row without a
    non-empty text stops with the file, row and config key."""
    if not source:
        raise loaders.DataError(f"{key} is empty: no general text to measure forgetting on")
    texts = []
    for n, row in loaders.read_rows(source):
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            raise loaders.DataError(f"{source} row {n}: needs a non-empty 'text' field for the forgetting check "
                                 f"({key}), got columns {sorted(row)}")
        texts.append(text)
    if not texts:
        raise loaders.DataError(f"{source}: no rows ({key} needs general text passages)")
    return texts


def encode_passages(tok, texts: Sequence[str], source: str, max_tokens: int, batch_size: int) -> GeneralText:
    """Tokenize (at most ``max_tokens`` tokens each) and batch; a passage needs 2 tokens to score one."""
    if max_tokens < 2 or batch_size < 1:
        raise ValueError(f"max_tokens must be >= 2 and batch_size >= 1, got {max_tokens} and {batch_size}")
    encoded, truncated = [], 0
    for i, text in enumerate(texts):
        ids = tok(text).input_ids
        if len(ids) < 2:
            raise loaders.DataError(f"{source} row {i + 1}: '{text[:40]}' is {len(ids)} token long; the forgetting "
                                 "check scores each token after the first, so a passage needs at least 2")
        truncated += len(ids) > max_tokens
        encoded.append(ids[:max_tokens])
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))  # similar lengths share a batch
    batches = []
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        width = len(encoded[idx[0]])
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, :len(encoded[i])] = torch.tensor(encoded[i])
            mask[r, :len(encoded[i])] = 1
        batches.append((ids, mask, torch.tensor(idx)))
    return GeneralText(source, batches, len(encoded), sum(len(e) - 1 for e in encoded), truncated)


# ---------------------------------------------------------------------------------------------
# The measurement


def _adapters(model, names: Optional[list[str]]):
    if hasattr(model, "peft_config"):
        return stacking.active_adapters(model, names)
    if names:
        raise ValueError(f"adapters {names} given for a model without adapters")
    return contextlib.nullcontext()


class ForgettingProbe:
    """The general text with the base's final hidden states and LM head, computed once; :meth:`measure`
    then costs one forward per model.

    ``model`` is the base: a PeftModel (measured with every adapter off; its head without any adapter
    on it) or a plain model. ``snapshot`` keeps a copy of the head, for a model whose head will train
    (a full fine-tune: its embeddings are tied to the head).
    """

    def __init__(self, model, text: GeneralText, snapshot: bool = False, chunk: int = CHUNK):
        self.text = text
        self.chunk = chunk
        self.device = next(model.parameters()).device
        head = forwards.output_head(model)
        head = head.get_base_layer() if hasattr(head, "get_base_layer") else head
        self.base_head = copy.deepcopy(head) if snapshot else head
        self.base_model = model
        self.snapshot = snapshot
        with torch.no_grad(), _adapters(model, None):
            self.base_hidden = [forwards.final_hidden(model, ids.to(self.device), mask.to(self.device))
                                for ids, mask, _ in text.batches]
        vocab = self.base_head.out_features
        self.base_logprobs = None
        self._trunk: Optional[tuple[tuple, list]] = None  # ((adapters, split), states per batch): _shared_trunk
        if text.tokens * vocab * 4 <= BASE_LOGPROBS_MAX_BYTES:
            self.base_logprobs = [[self._base_logprobs(h[s:s + chunk]) for s in range(0, h.shape[0], chunk)]
                                  for h in self._scored_hidden(self.base_hidden)]

    def _scored_hidden(self, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each batch's hidden states at the positions that predict a real token, (n, H)."""
        return [h[:, :-1][mask[:, 1:].bool().to(self.device)] for h, (_, mask, _) in zip(hidden, self.text.batches)]

    def _base_logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), loading.compute_context(self.base_model):
            return F.log_softmax(self.base_head(hidden), dim=-1, dtype=torch.float32)

    def _shared_trunk(self, adapters: Optional[list[str]], trunk_of: Optional[list[str]]) -> tuple[int, Optional[list]]:
        """``(split, states per batch)``: what ``trunk_of``'s layers below ``split`` compute over the text,
        where ``adapters`` hold no weight below it (a policy with LoRA on its top layers over its SFT
        adapter); run once and kept for the next model. ``(0, None)`` where nothing is shared."""
        if not trunk_of or not adapters or not trunk.SHARE_TRUNK:
            return 0, None
        differing = trunk.differing_adapters(trunk_of, adapters)
        split = trunk.trunk_split(self.base_model, differing) if differing else 0
        if not 0 < split < len(loading.decoder_layers(self.base_model)[1]):
            return 0, None
        key = (tuple(trunk_of), split)
        if self._trunk is None or self._trunk[0] != key:
            with torch.no_grad():
                states = [trunk.layer_states(self.base_model, split, trunk_of, ids.to(self.device), mask.to(self.device))
                          for ids, mask, _ in self.text.batches]
            self._trunk = (key, states)
        return split, self._trunk[1]

    def measure(self, model=None, adapters: Optional[list[str]] = None, trunk_of: Optional[list[str]] = None) -> dict:
        """Loss, perplexity and KL to the base of ``model`` (default: the base model) with ``adapters``
        active (None: every adapter off): :func:`summarize` plus per-passage ``nll_sums``/``kl_sums``/
        ``token_counts`` in file order. ``trunk_of``: adapters that compute what ``adapters`` do below
        some layer (the SFT adapter under a policy with LoRA on its top layers): those layers run once
        for every such model, and each runs only the layers above (the same numbers to float round-off)."""
        model = self.base_model if model is None else model
        split, states = self._shared_trunk(adapters, trunk_of) if model is self.base_model else (0, None)
        head = forwards.output_head(model)
        n = self.text.passages
        nll_sums = torch.zeros(n, dtype=torch.float64)
        kl_sums = torch.zeros(n, dtype=torch.float64)
        counts = torch.zeros(n, dtype=torch.long)
        # The base itself (every adapter off, its weights as the probe saw them) has its hidden states kept.
        own = model is self.base_model and not adapters and not self.snapshot
        with torch.no_grad(), _adapters(model, adapters):
            for b, ((ids, mask, index), base_hidden) in enumerate(zip(self.text.batches, self.base_hidden)):
                ids, mask = ids.to(self.device), mask.to(self.device)
                if own:
                    hidden = base_hidden
                elif states is not None:
                    hidden = trunk.replayed_final_hidden(model, split, states[b], ids, mask)
                else:
                    hidden = forwards.final_hidden(model, ids, mask)
                # position t predicts token t + 1; score where that token is real
                scored = mask[:, 1:].bool()
                h, hb = hidden[:, :-1][scored], base_hidden[:, :-1][scored]
                targets = ids[:, 1:][scored]
                passage = index.to(self.device)[scored.nonzero(as_tuple=True)[0]].cpu()
                for c, s in enumerate(range(0, targets.shape[0], self.chunk)):
                    with loading.compute_context(model):
                        logits = head(h[s:s + self.chunk])
                    logq = (self.base_logprobs[b][c] if self.base_logprobs is not None
                            else self._base_logprobs(hb[s:s + self.chunk]))
                    nll, kl = nll_and_kl(logits, logq, targets[s:s + self.chunk])
                    rows = passage[s:s + self.chunk]
                    nll_sums.index_add_(0, rows, nll.double().cpu())
                    kl_sums.index_add_(0, rows, kl.double().cpu())
                    counts.index_add_(0, rows, torch.ones_like(rows))
        out = summarize(nll_sums.tolist(), kl_sums.tolist(), counts.tolist())
        return {**out, "nll_sums": nll_sums.tolist(), "kl_sums": kl_sums.tolist(), "token_counts": counts.tolist()}


# ---------------------------------------------------------------------------------------------
# Reporting


def columns(stats: Optional[dict]) -> dict:
    """The curves.csv columns of one model's :meth:`ForgettingProbe.measure` result (None: all empty)."""
    if stats is None:
        return dict.fromkeys(COLUMNS)
    return {"general_nll": stats["nll"], "general_ppl": stats["ppl"], "general_kl_to_base": stats["kl"]}


def table(rows: Sequence[tuple[str, dict]], text: GeneralText) -> str:
    """An aligned table: per model, loss (and its change from the first row, the base), perplexity and
    KL to the base, each per token."""
    w = max([13] + [len(name) for name, _ in rows])
    first = rows[0][1]["nll"] if rows else math.nan
    cut = f", {text.truncated} cut to eval.forgetting_max_tokens" if text.truncated else ""
    lines = [f"Forgetting check on {text.source} ({text.passages} passages, {text.tokens} scored tokens{cut}; "
             f"text no stage trained on):",
             f"{'model':<{w}} {'loss (nats/token)':>17} {'vs base':>8} {'perplexity':>10} "
             f"{'KL to base (nats/token)':>23}"]
    lines.append("-" * len(lines[-1]))
    for name, s in rows:
        lines.append(f"{name:<{w}} {s['nll']:>17.4f} {s['nll'] - first:>+8.4f} {s['ppl']:>10.3f} {s['kl']:>23.4f}")
    return "\n".join(lines) + "\n"
