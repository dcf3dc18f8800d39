"""Forward passes that score given sequences: left-padded batches, the response tokens' logprobs (from
logits / temperature) and entropies, the hidden states that predict them, and pooled or last-token
hidden states for score heads. Used by rollouts, PPO's update, the reward model and the forgetting
probe alike, so that every logprob in the pipeline is computed one way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

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
    backbone, lm_head = _backbone_and_head(model)
    input_ids = torch.cat([query_ids, response_ids], dim=1)
    attn = torch.cat([query_mask.long(), response_mask.long()], dim=1)
    # Padding after the stop token keeps attention 0; position ids ignore the left padding.
    position_ids = (attn.cumsum(dim=1) - 1).clamp(min=0)
    p, t = query_ids.shape[1], response_ids.shape[1]
    with loading.compute_context(model):
        hidden = backbone(input_ids=input_ids, attention_mask=attn, position_ids=position_ids,
                          use_cache=False).last_hidden_state
        h = hidden[:, p - 1:p - 1 + t]
        if lm_head.bias is None:
            # lm_head(h) / T == lm_head(h / T): divide the (B, T, H) input, not the (B, T, vocab) logits.
            logits = lm_head(h / temperature)
        else:
            logits = lm_head(h) / temperature
    # bf16/fp16 logits go to ppo_math as they are: it upcasts one row at a time for the log-softmax
    # (float32 accuracy without a (B, T, vocab) float32 copy: 50 MB per copy at batch 8 on the
    # embedded model, and on CPU every such fresh allocation is page-faulted in).
    logprobs = ppo_math.logprobs_from_logits(logits, response_ids)
    entropy = None
    if with_entropy:
        # A logged statistic, not part of the loss: no autograd graph over the vocabulary.
        with torch.no_grad():
            entropy = ppo_math.entropy_from_logits(logits)
    return ForwardOut(logprobs=logprobs, entropy=entropy, hidden=h if with_hidden else None)


def mean_pool(hidden: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` (B, T, H) over the positions where ``pool_mask`` (B, T) is 1, in float32: (B, H).

    A row with no pooled position gives zeros. Rows ((1, 2), (3, 4), (5, 6)) with mask (1, 0, 1):
    ((1 + 5) / 2, (2 + 6) / 2) = (3, 4)."""
    m = pool_mask.to(torch.float32).unsqueeze(-1)
    return (hidden.float() * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


def response_pooled_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           response_mask: torch.Tensor) -> torch.Tensor:
    """Final hidden states averaged over each row's response tokens (``response_mask``), (B, H) float32:
    what the reward model's score head reads. Rows are left-padded; position ids come from the mask."""
    return mean_pool(final_hidden(model, input_ids, attention_mask), response_mask)


def last_hidden_at(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   index: torch.Tensor) -> torch.Tensor:
    """Final hidden state at ``index`` (B,) of each row: what a score head reads. (B, H)."""
    hidden = final_hidden(model, input_ids, attention_mask)
    return hidden[torch.arange(hidden.shape[0]), index]


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
