"""Forward passes that score given sequences: left-padded batches, the response tokens' logprobs (from
logits / temperature) and entropies, the hidden states that predict them, and pooled or last-token
hidden states for score heads. Used by rollouts, PPO's update, the reward model and the forgetting
probe alike, so that every logprob in the pipeline is computed one way.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from transformers.modeling_outputs import BaseModelOutputWithPast

from pipeline.models import loading
from pipeline.rl import ppo_math


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) ids and attention mask, padded on the left."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


@dataclass
class ForwardOut:
    logprobs: torch.Tensor  # (B, T)
    entropy: Optional[torch.Tensor]  # (B, T)
    hidden: Optional[torch.Tensor]  # (B, T, H): hidden state that predicts each response token


def _backbone_and_head(model):
    """The decoder backbone (returns ``last_hidden_state``) and the LM head of a causal LM, plain or in peft.

    Found through what transformers exposes on every family, not one family's attribute names:
    ``base_model`` is the module named by ``base_model_prefix`` (``model`` on Llama/Qwen/OPT,
    ``transformer`` on GPT-2/Falcon, ``gpt_neox`` on Pythia) and ``get_output_embeddings()`` is the
    vocabulary projection (``lm_head``, ``embed_out``); a sequence classifier has none (None)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    return inner.base_model, head


def backbone(model) -> torch.nn.Module:
    """The decoder backbone of a causal LM, plain or in peft (returns ``last_hidden_state``)."""
    return _backbone_and_head(model)[0]


def score_head(model) -> torch.nn.Module:
    """The head a sequence classifier puts on its backbone (``score`` on every family transformers
    builds), plain or in peft: its one child beside ``base_model``. Shapes: (..., H) -> (..., labels)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    heads = [m for name, m in inner.named_children() if name != inner.base_model_prefix]
    if len(heads) != 1:
        raise ValueError(f"{type(inner).__name__}: expected one head beside the backbone, found "
                         f"{[n for n, _ in inner.named_children()]}")
    return heads[0]  # in peft, its ModulesToSaveWrapper


def forward_response(model, query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor,
                     response_mask: torch.Tensor, temperature: float, with_entropy: bool = False,
                     with_hidden: bool = False) -> ForwardOut:
    """Logprobs of the response tokens under ``model`` (logits / temperature), B x T.

    The LM head runs only on the T positions that predict response tokens (position P-1+t predicts
    response token t), which saves most of the vocabulary projection for short responses.
    """
    net = backbone(model)
    t = response_ids.shape[1]
    with loading.compute_context(model):
        # The system prompt every row starts with, and each prompt the rows repeat (eval's samples per
        # prompt), run once and serve the rows from their cache; the padding value is masked (0 does).
        ids, mask, cache = prefill_prompts(model, query_ids, query_mask, 0)
        c = cache.get_seq_length() if cache is not None else 0
        full_mask = torch.cat([mask.long(), response_mask.long()], dim=1)
        # padding after the stop token keeps attention 0; position ids ignore the padding
        position_ids = (full_mask.cumsum(dim=1) - 1).clamp(min=0)
        hidden = net(input_ids=torch.cat([ids[:, c:], response_ids], dim=1), attention_mask=full_mask,
                     position_ids=position_ids[:, c:], past_key_values=cache,
                     use_cache=cache is not None).last_hidden_state
        q = ids.shape[1] - c  # query columns left in the pass; the last one predicts response token 0
    return response_outputs(model, hidden[:, q - 1:q - 1 + t], response_ids, temperature, with_entropy,
                            with_hidden)


def response_outputs(model, h: torch.Tensor, response_ids: torch.Tensor, temperature: float,
                     with_entropy: bool = False, with_hidden: bool = False) -> ForwardOut:
    """Logprobs (B, T) of ``response_ids`` (B, T) from ``h`` (B, T, H), the final hidden states that
    predict them, through the LM head with logits / temperature (and entropies, ``h`` when asked)."""
    _, lm_head = _backbone_and_head(model)
    if type(lm_head) is torch.nn.Linear and lm_head.bias is None and not lm_head.weight.requires_grad:
        # the head and the log-softmax in one function, in blocks of the vocabulary: no (B, T, vocab) logits
        w = lm_head.weight
        logprobs, entropy = ppo_math.head_token_logprobs_and_entropy(
            (h / temperature).to(w.dtype), w, response_ids, with_entropy=with_entropy)
        return ForwardOut(logprobs=logprobs, entropy=entropy, hidden=h if with_hidden else None)
    with loading.compute_context(model):
        if lm_head.bias is None:
            # lm_head(h) / T == lm_head(h / T): divide the (B, T, H) input, not the (B, T, vocab) logits.
            logits = lm_head(h / temperature)
        else:
            logits = lm_head(h) / temperature
    # bf16/fp16 logits go to ppo_math as they are: it upcasts one row at a time (float32 accuracy without
    # a (B, T, vocab) float32 copy: 50 MB per copy at batch 8 on the embedded model, and on CPU every such
    # fresh allocation is page-faulted in). The entropy, a logged statistic, comes from the same pass.
    logprobs, entropy = ppo_math.token_logprobs_and_entropy(logits, response_ids, with_entropy=with_entropy)
    return ForwardOut(logprobs=logprobs, entropy=entropy, hidden=h if with_hidden else None)


# Prefix sharing: rows that begin with the same tokens (every row's system prompt, a preference pair's
# prompt) run those tokens once per group and attend to their cached keys and values, exactly as a
# prompt cache serves them at inference (vLLM's automatic prefix caching; Kwon et al. 2023). With
# gradients on, the cache is part of the graph: the rows' gradients flow back into the shared pass.
SHARE_PREFIXES = True


def common_prefix(rows: Sequence[Sequence[int]], limit: int) -> int:
    """How many leading tokens all ``rows`` share, at most ``limit``. (5, 6, 7) and (5, 6, 8): 2;
    (5, 6, 7) and (4, 5, 6): 0."""
    n = max(min([limit, *(len(r) for r in rows)]), 0)
    first = rows[0]
    for row in rows[1:]:
        n = next((k for k in range(n) if first[k] != row[k]), n)
    return n


def common_prefix_length(ids: torch.Tensor, lengths: torch.Tensor, limit: int) -> int:
    """:func:`common_prefix` of the real tokens of left-padded ``ids`` (B, P), ``lengths`` (B,) counting
    each row's. Rows (0, 5, 6, 7) and (4, 5, 6, 8) with lengths (3, 4): (5, 6, 7) and (4, 5, 6, 8) share
    none: 0; (5, 6, 7), (5, 6, 8): 2."""
    if limit <= 0:
        return 0
    p = ids.shape[1]
    return common_prefix([row[p - n:p - n + limit].tolist() for row, n in zip(ids, lengths.tolist())], limit)


@dataclass
class PrefixedRows:
    """Rows laid out for prefix sharing (:func:`prefixed_rows`): row i is ``prefix_ids[group[i]]`` followed
    by ``ids[i]``.

    ``prefix_ids``, ``prefix_mask``: (G, Sp) each group's shared start, left-padded (Sp 0: none shared);
    ``ids``, ``mask``: (B, S) each row's own rest, right-padded (its tokens start at column 0);
    ``group``: (B,) each row's group; ``pool``: (B, S) bool, True on the row's response tokens;
    ``last``: (B,) the column of its last token."""
    prefix_ids: torch.Tensor
    prefix_mask: torch.Tensor
    ids: torch.Tensor
    mask: torch.Tensor
    group: torch.Tensor
    pool: torch.Tensor
    last: torch.Tensor

    def full_mask(self) -> torch.Tensor:
        """(B, Sp + S) attention mask of the whole rows, prefix columns first."""
        return torch.cat([self.prefix_mask.long()[self.group], self.mask.long()], dim=1)


def prefixed_rows(encoded: Sequence[tuple[Sequence[int], int]], pad_id: int, device,
                  groups: Optional[Sequence] = None, share: Optional[bool] = None) -> PrefixedRows:
    """Rows ``(ids, response_start)`` split into the start their group shares and their own rest. Rows
    with the same ``groups`` entry (default: all rows one group) share the tokens they all begin with, up
    to the group's earliest response start and never a row's last token, so every pooled position is a
    row's own (a one-row group: its tokens before its response). One row alone, and every row when
    ``share`` is False (default: :data:`SHARE_PREFIXES`), share nothing. E.g. rows (5, 6, 7, 8) and (5, 6, 9), responses from 3 and 2, one group: prefix (5, 6);
    rests (7, 8) and (9,)."""
    share = SHARE_PREFIXES if share is None else share
    groups = list(groups) if groups is not None else [0] * len(encoded)
    index = {g: i for i, g in enumerate(dict.fromkeys(groups))}
    members: list[list[int]] = [[] for _ in index]
    for row, g in enumerate(groups):
        members[index[g]].append(row)
    # Rows alone in their group make one group: a prefix of one row's own would cost a pass over it for
    # that row alone (PPO's batches, one sample of each prompt, would run every prompt in a pass of its
    # own), while together they share what they all begin with (the system prompt) at no extra pass.
    singles = [rows for rows in members if len(rows) == 1]
    if len(singles) > 1:
        members = [rows for rows in members if len(rows) > 1] + [[r for rows in singles for r in rows]]
    group, prefixes, cut = [0] * len(encoded), [], [0] * len(encoded)
    for g, rows in enumerate(members):
        limit = min(min(encoded[r][1] for r in rows), min(len(encoded[r][0]) for r in rows) - 1)
        # a group of one row has its prompt as its prefix too when there are other rows: the start the
        # groups' prefixes share (the system prompt) then runs once for all of them (prefixed_hidden)
        n = common_prefix([encoded[r][0] for r in rows], limit) if share and len(encoded) > 1 else 0
        prefixes.append(list(encoded[rows[0]][0][:n]))
        for r in rows:
            cut[r], group[r] = n, g
    prefix_ids, prefix_mask = left_pad(prefixes, pad_id)
    suffixes = [list(ids[c:]) for (ids, _), c in zip(encoded, cut)]
    width = max(len(x) for x in suffixes)
    ids = torch.full((len(suffixes), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(suffixes), width), dtype=torch.long)
    for i, x in enumerate(suffixes):
        ids[i, :len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, :len(x)] = 1
    starts = torch.tensor([s - c for (_, s), c in zip(encoded, cut)]).unsqueeze(1)
    pool = (torch.arange(width).unsqueeze(0) >= starts) & mask.bool()
    last = torch.tensor([len(x) - 1 for x in suffixes])
    group = torch.tensor(group, dtype=torch.long)
    return PrefixedRows(*(t.to(device) for t in (prefix_ids, prefix_mask, ids, mask, group, pool, last)))


def prefill_prompts(model, query_ids: torch.Tensor, query_mask: torch.Tensor, pad_id: int):
    """Run the tokens every row's prompt starts with (the chat template's system prompt) once, and each
    distinct prompt once however many rows repeat it, for a forward or ``generate`` to continue from:
    ``(ids, mask, cache)``. ``ids`` (B, S + R) is that shared start followed by each row's rest,
    left-padded (padding sits between the two; position ids count real tokens, so a row's logits do not
    depend on it); ``cache`` holds, for every row, the keys and values of the shared start and, where
    rows repeat a prompt, of its rest but the last column (the caller runs that column, one token a row,
    whose logits draw or score the first response token). ``(query_ids, query_mask, None)`` where
    nothing is shared, for one row, and for models whose cache is not a plain key/value store.
    ``pad_id`` fills the padding (masked, so any token id does).

    The prompt cache of an inference server (vLLM's automatic prefix caching; Kwon et al. 2023), here
    within one batch: on the embedded default ~33 of a prompt's ~45 tokens are the system prompt, and
    the prefill of 32 rows ran 32 times over it; eval draws 4 samples of each prompt (best-of-n 16), and
    each prompt's rest ran 4 (16) times. Logits equal the plain prefill's to float round-off.
    """
    net = backbone(model)
    b, p = query_ids.shape
    if b < 2 or not SHARE_PREFIXES or not vars(net).get("_rlhf_prefix_cache", True):
        return query_ids, query_mask, None
    # distinct prompts (with their padding: rows of one left-padded batch that are equal are the same prompt)
    distinct, inverse = torch.unique(torch.cat([query_ids, query_mask.long()], dim=1), dim=0,
                                     return_inverse=True)
    uq_ids, uq_mask = distinct[:, :p], distinct[:, p:]
    u = uq_ids.shape[0]
    real = uq_mask.sum(dim=1)
    shared = common_prefix_length(uq_ids, real, int(real.min()) - 1) if u > 1 else int(real[0]) - 1
    if shared == 0 and u == b:
        return query_ids, query_mask, None
    prefix, rest, rest_mask = split_shared(uq_ids, uq_mask, shared, pad_id)
    # every distinct rest but its last column (a left-padded row's last token sits there), where rows repeat
    run = rest[:, :-1] if u < b else rest[:, :0]
    built = cache_prefixes(net, prefix, run, rest_mask[:, :run.shape[1]])
    if built is None:
        return query_ids, query_mask, None
    cache = built[1]
    select_cache_rows(cache.layers, inverse.to(query_ids.device))
    ids = torch.cat([prefix.expand(b, -1), rest[inverse]], dim=1)
    ones = torch.ones((b, shared), dtype=rest_mask.dtype, device=rest_mask.device)
    mask = torch.cat([ones, rest_mask[inverse]], dim=1).to(query_mask.dtype)
    return ids, mask, cache


def split_shared(ids: torch.Tensor, mask: torch.Tensor, shared: int, pad_id: int):
    """Left-padded rows ``ids`` (U, P) (``mask`` 1 on real tokens) whose first ``shared`` real tokens are
    the same in every row, split into those tokens (1, shared) and each row's rest, left-padded again:
    ``(top, rest (U, R), rest_mask (U, R))``. Rows (0, 5, 6, 7) and (5, 6, 8, 9), shared 2: top (5, 6),
    rests (0, 7) and (8, 9)."""
    p = ids.shape[1]
    real = mask.long().sum(dim=1).tolist()
    top = ids[:1, p - real[0]:p - real[0] + shared]
    rest, rest_mask = left_pad([row[p - n + shared:].tolist() for row, n in zip(ids, real)], pad_id)
    return top, rest.to(ids.device), rest_mask.to(ids.device)


def prefix_levels(prefix_ids: torch.Tensor, prefix_mask: torch.Tensor, top: Optional[int] = None):
    """Groups' prefixes (G, Sp), left-padded, as the start they all share and each group's rest: ``(top
    (1, s), rest (G, R), rest_mask (G, R), mask (G, s + R))``, ``mask`` the prefixes' columns as their cache
    holds them (the top, then each rest left-padded). ``top`` fixes s (a subset of the groups may share
    more than the set they were run with); default: all they share, the whole prefix for one group.
    Prefixes (1, 7, 8) and (1, 9): top (1,), rests (7, 8) and (0, 9)."""
    real = prefix_mask.long().sum(dim=1)
    if top is None:
        g = prefix_ids.shape[0]
        top = common_prefix_length(prefix_ids, real, int(real.min())) if g > 1 else int(real[0])
    head, rest, rest_mask = split_shared(prefix_ids, prefix_mask, top, 0)
    ones = torch.ones((rest.shape[0], top), dtype=torch.long, device=rest.device)
    return head, rest, rest_mask, torch.cat([ones, rest_mask.long()], dim=1)


def cache_prefixes(net, top: torch.Tensor, rest: torch.Tensor, rest_mask: torch.Tensor):
    """Keys and values of U rows that all start with ``top`` (1, s), then their own ``rest`` (U, R),
    left-padded (``rest_mask``): the top runs once, and each rest once on top of it. ``(mask (U, s + R),
    cache)``, the mask the rows' continuation attends with; None where there is nothing to run, or the
    backbone's cache is not a plain key/value store (then marked, so that it is not tried again)."""
    u, s = rest.shape[0], top.shape[1]
    ones = torch.ones((u, s), dtype=torch.long, device=rest.device)
    mask = torch.cat([ones, rest_mask.long()], dim=1)
    cache = None
    if s:
        cache = net(input_ids=top, attention_mask=ones[:1],
                    position_ids=torch.arange(s, device=top.device).unsqueeze(0), use_cache=True).past_key_values
        if not plain_cache(cache):
            net._rlhf_prefix_cache = False
            return None
        select_cache_rows(cache.layers, torch.zeros(u, dtype=torch.long, device=top.device))
    if rest.shape[1]:
        cache = net(input_ids=rest, attention_mask=mask, position_ids=(mask.cumsum(dim=1) - 1).clamp(min=0)[:, s:],
                    past_key_values=cache, use_cache=True).past_key_values
        if not plain_cache(cache):
            net._rlhf_prefix_cache = False
            return None
    return (mask, cache) if cache is not None else None


def select_cache_rows(layers, index: torch.Tensor) -> None:
    """Each cache layer's keys and values (G, heads, Sp, head_dim) at batch rows ``index`` (B,): a group's
    prefix then serves each of its rows."""
    for layer in layers:
        layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)


def plain_cache(cache) -> bool:
    """Whether every layer of a transformers cache is a plain growing key/value store: sliding-window,
    static, linear-attention and quantized layers keep something else, and prefix sharing steps aside."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer).__name__ == "DynamicLayer" for layer in layers)


def prefixed_hidden(model, prefix_ids: torch.Tensor, prefix_mask: torch.Tensor, suffix_ids: torch.Tensor,
                    suffix_mask: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Final hidden states (B, S, H) of rows made of a shared prefix and their own suffix: row i is
    ``prefix_ids[group[i]]`` (G, Sp; left-padded, ``prefix_mask`` 1 on real tokens) followed by
    ``suffix_ids[i]`` (B, S; ``suffix_mask`` 0 on padding anywhere). Each prefix runs once; the rows'
    suffixes attend to its cached keys and values. The start all prefixes share runs once for all of
    them (a batch of preference pairs: every pair's prompt once, and the system prompt they all begin
    with once, not once per pair). Equal to the backbone over the concatenated rows to
    float round-off. Models whose cache is not a plain key/value store (sliding windows, linear
    attention) and empty prefixes take that plain path."""
    backbone, _ = _backbone_and_head(model)
    sp = prefix_ids.shape[1]
    # A backbone whose cache proved not plain is remembered, so its prefix pass is not run again for nothing.
    if sp and SHARE_PREFIXES and vars(backbone).get("_rlhf_prefix_cache", True):
        # The groups' prefixes share a start of their own (every row's system prompt): it runs once, then
        # each group's rest (its prompt) once on top of it, then the rows.
        top, rest, rest_mask, _ = prefix_levels(prefix_ids, prefix_mask)
        built = cache_prefixes(backbone, top, rest, rest_mask)
        if built is not None:
            mask, cache = built
            select_cache_rows(cache.layers, group)
            full_mask = torch.cat([mask[group], suffix_mask.long()], dim=1)
            position_ids = (full_mask.cumsum(dim=1) - 1).clamp(min=0)[:, mask.shape[1]:]
            return backbone(input_ids=suffix_ids, attention_mask=full_mask, position_ids=position_ids,
                            past_key_values=cache, use_cache=True).last_hidden_state
    full_mask = torch.cat([prefix_mask.long()[group], suffix_mask.long()], dim=1)
    position_ids = (full_mask.cumsum(dim=1) - 1).clamp(min=0)
    ids = torch.cat([prefix_ids[group], suffix_ids], dim=1)
    return backbone(input_ids=ids, attention_mask=full_mask, position_ids=position_ids,
                    use_cache=False).last_hidden_state[:, sp:]


def right_padded_lengths(attention_mask: torch.Tensor) -> Optional[torch.Tensor]:
    """(B,) real tokens per row of a right-padded ``attention_mask`` (B, T) (each row's ones, then its
    zeros); None for any other layout. Masks (1, 1, 0) and (1, 1, 1): (2, 3); (0, 1, 1): None."""
    lengths = attention_mask.long().sum(dim=1)
    columns = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    if not torch.equal(attention_mask.long(), (columns.unsqueeze(0) < lengths.unsqueeze(1)).long()):
        return None
    return lengths


# SFT's shared row starts (shared_row_starts) pay from this many rows in a micro-batch: in float32 on a
# 2-core AVX2 EPYC (README "SFT rows share their start") 8 rows trained 1.31x faster with them (three
# runs), and 4 rows, the default's micro-batch, took 0.978 +- 0.031 of the time (three pairs), within noise.
SHARE_START_MIN_ROWS = 8


def shares_row_starts(rows: int) -> bool:
    """Whether :func:`shared_row_starts` runs a micro-batch of ``rows`` rows' common start once."""
    return SHARE_PREFIXES and rows >= max(SHARE_START_MIN_ROWS, 2)


@dataclass
class StartCount:
    """Tokens the backbone got (``given``) and ran (``ran``) in the gradient-carrying forwards under
    :func:`shared_row_starts`: they differ by the start rows shared, run once instead of once a row."""
    given: int = 0
    ran: int = 0


@contextlib.contextmanager
def shared_row_starts(model):
    """Within the block, a forward of the backbone over right-padded rows (``input_ids`` and
    ``attention_mask`` only, as trl's SFTTrainer gives them) runs the tokens every row begins with once,
    and the rows' rests attend to its cached keys and values; with gradients on, the cache is part of
    the graph, so the shared start's gradient is the sum over the rows, as in the plain forward. Hidden
    states (B, T, H) equal the plain forward's to float round-off; the start's positions carry the one
    row's states for every row. Yields a :class:`StartCount`.

    On the embedded default every SFT row opens with the chat template's system prompt and user header,
    24 tokens of a 73-token row on average; a micro-batch of 4 rows ran them 4 times. The start is never a
    row's last real token, so every row runs at least one token of its own. Steps aside (the plain
    forward) for fewer than :data:`SHARE_START_MIN_ROWS` rows, other padding, explicit positions, embeddings or caches, gradient
    checkpointing, and backbones whose cache is not a plain key/value store (:func:`plain_cache`).
    """
    net = backbone(model)
    count = StartCount()
    plain = net.forward

    def forward(input_ids=None, attention_mask=None, **kwargs):
        lengths = None
        if (input_ids is not None and attention_mask is not None and shares_row_starts(input_ids.shape[0])
                and kwargs.get("position_ids") is None and kwargs.get("past_key_values") is None
                and kwargs.get("inputs_embeds") is None and vars(net).get("_rlhf_prefix_cache", True)
                and not (net.training and getattr(net, "gradient_checkpointing", False))):
            lengths = right_padded_lengths(attention_mask)
        shared = 0
        if lengths is not None:
            shared = common_prefix([row[:n] for row, n in zip(input_ids.tolist(), lengths.tolist())],
                                   int(lengths.min()) - 1)
        given = int(attention_mask.sum()) if attention_mask is not None else input_ids.numel()
        out = None
        if shared:
            out = _start_once(input_ids, attention_mask, shared, kwargs)
        counting = torch.is_grad_enabled()
        count.given += given if counting else 0
        if out is None:
            count.ran += given if counting else 0
            return plain(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        count.ran += shared + int(attention_mask[:, shared:].sum()) if counting else 0
        return out

    def _start_once(input_ids, attention_mask, shared, kwargs):
        """The rows' hidden states with their first ``shared`` tokens run once; None where the backbone's
        cache is not a plain key/value store (then marked, and the plain forward runs)."""
        b, t = input_ids.shape
        kwargs = {k: v for k, v in kwargs.items() if k not in ("use_cache", "position_ids")}
        top = plain(input_ids=input_ids[:1, :shared], attention_mask=attention_mask[:1, :shared],
                    position_ids=torch.arange(shared, device=input_ids.device).unsqueeze(0), use_cache=True, **kwargs)
        cache = top.past_key_values
        if not plain_cache(cache):
            net._rlhf_prefix_cache = False
            return None
        select_cache_rows(cache.layers, torch.zeros(b, dtype=torch.long, device=input_ids.device))
        rest = plain(input_ids=input_ids[:, shared:], attention_mask=attention_mask,
                     position_ids=torch.arange(shared, t, device=input_ids.device).unsqueeze(0).expand(b, -1),
                     past_key_values=cache, use_cache=True, **kwargs)
        hidden = torch.cat([top.last_hidden_state.expand(b, -1, -1), rest.last_hidden_state], dim=1)
        return BaseModelOutputWithPast(last_hidden_state=hidden)

    own = vars(net).get("forward")
    net.forward = forward
    try:
        yield count
    finally:
        if own is None:
            del net.forward
        else:
            net.forward = own


def mean_pool(hidden: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` (B, T, H) over the positions where ``pool_mask`` (B, T) is 1, in float32: (B, H).

    A row with no pooled position gives zeros. Rows ((1, 2), (3, 4), (5, 6)) with mask (1, 0, 1):
    ((1 + 5) / 2, (2 + 6) / 2) = (3, 4)."""
    m = pool_mask.to(torch.float32).unsqueeze(-1)
    return (hidden.float() * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


def pool_hidden(hidden: torch.Tensor, pool: torch.Tensor, last: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, H) float32 features of ``hidden`` (B, T, H): the mean over the positions ``pool`` (B, T) marks
    (the response tokens), or with ``pooling`` "last" the positions ``last`` (B,)."""
    if pooling == "last":
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()
    return mean_pool(hidden, pool)


def final_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The backbone's final hidden states (B, T, H), without the LM head, in the model's compute
    precision. Rows may be left- or right-padded: position ids count the real tokens of each row."""
    backbone, _ = _backbone_and_head(model)
    position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
    with loading.compute_context(model):
        return backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=False).last_hidden_state


def output_head(model) -> torch.nn.Module:
    """The LM head (vocabulary projection) of a causal LM, plain or wrapped in peft."""
    return _backbone_and_head(model)[1]
