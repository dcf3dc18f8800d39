"""The shared trunk: decoder layers that no trained adapter touches run once, and every pass that
differs only above them (reward-ensemble members, PPO's reference, old and training passes) replays
their output and runs its own top layers.

With LoRA on the top layers only (``lora.top_layers``), the layers below the lowest adapted one compute
the same for every adapter set that has no weights there: the members of a reward ensemble, and in
PPO the reference (the SFT adapter or the bare base) and the policy on top of it. Nothing below the
split trains, so the trunk runs without gradients and no gradient is lost. Rows that begin alike (a
pair's prompt, every row's system prompt) run that start once per group, in the trunk and above it;
the rows attend to their cached keys and values (prefix sharing, as
:func:`pipeline.models.forwards.prefixed_hidden` and :func:`~pipeline.models.forwards.prefix_levels`).

``adapter`` arguments name what is active: one adapter, a stack of them (PPO's ``["sft", "policy"]``),
or None for the base with every adapter off (:func:`pipeline.models.stacking.active_adapters`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence, Union

import torch

from pipeline.models import forwards, lean_ops, loading, stacking

Adapters = Union[str, Sequence[str], None]

# PPO replays the trunk wherever its LoRA leaves the lower layers out (ppo.lora.top_layers); off, every
# pass runs every layer (benchmarks/ppo_step.py compares the two).
SHARE_TRUNK = True
# Reward-ensemble members run their own layers in one batch (members_hidden); off, one member at a time.
BATCH_MEMBERS = True


def _names(adapter: Adapters) -> Optional[list[str]]:
    return [adapter] if isinstance(adapter, str) else (list(adapter) if adapter else None)


def trunk_split(model, adapters: Sequence[str]) -> int:
    """Index of the lowest decoder layer that holds a LoRA weight of any of ``adapters``: every layer
    below it computes the same for all of them. 0 (nothing shared) when the layers cannot be found."""
    try:
        _, stack = loading.decoder_layers(model)
    except ValueError:
        return 0
    tags = [f".{a}." for a in adapters]
    for i, layer in enumerate(stack):
        if any(".lora_" in n and any(t in n for t in tags) for n, _ in layer.named_parameters()):
            return i
    return len(stack)


class _TrunkDone(Exception):
    """Raised by the capture hook: the layers above the trunk are not needed in the shared pass."""


@dataclass
class Trunk:
    """What the layers below ``split`` computed, once for every member, as decoder layer ``split - 1``
    returned it (a tensor (.., H), or a tuple on some families): ``out`` on the rows' own columns
    (:attr:`forwards.PrefixedRows.ids`, (B, S, H)). When the rows share prefixes, these run in two levels
    (:func:`forwards.prefix_levels`): ``top`` on the start every group's prefix shares (1, s, H; None where s is 0),
    ``prefix`` on each group's rest (G, R, H; None where R is 0), and ``kv``, the prefixes' (keys, values)
    in each layer below ``split``, each (G, heads, s + R, head_dim), the top's columns first."""
    out: Any
    prefix: Optional[torch.Tensor] = None
    kv: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    top: Optional[torch.Tensor] = None

    @property
    def top_length(self) -> int:
        return self.top.shape[1] if self.top is not None else 0


def _position_ids(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(dim=1) - 1).clamp(min=0)


def _new_cache(backbone):
    """An empty cache of the backbone's layer types, filled in place by each pass it is given to (the
    trunk's capture hook stops a pass early, and what the layers below wrote stays)."""
    from transformers import DynamicCache

    return DynamicCache(config=backbone.config)


def _capture(model, split: int, adapter: Adapters, **inputs):
    """The output of decoder layer ``split - 1`` of the backbone on ``inputs``, only ``adapter`` active;
    the layers above do not run."""
    backbone, _ = forwards._backbone_and_head(model)
    _, stack = loading.decoder_layers(model)
    captured = {}

    def hook(module, args, output):
        captured["out"] = output
        raise _TrunkDone

    handle = stack[split - 1].register_forward_hook(hook)
    try:
        with stacking.active_adapters(model, _names(adapter)), loading.compute_context(model):
            backbone(**inputs)
    except _TrunkDone:
        pass
    finally:
        handle.remove()
    return captured["out"]


def _shares(rows: forwards.PrefixedRows) -> bool:
    return rows.prefix_ids.shape[1] > 0


@torch.no_grad()
def run_trunk(model, rows: forwards.PrefixedRows, split: int, adapter: Adapters) -> Optional[Trunk]:
    """The layers below ``split`` on ``rows``, computed once without gradients, with only ``adapter`` (a
    member, none of whose weights sit below ``split``) active: other adapters on the base, a policy's,
    stay out. Nothing below ``split`` trains, so no gradient is lost. None when ``split`` is 0, and when
    the rows share prefixes the trunk cannot serve (:func:`_prefixed_trunk`)."""
    if split <= 0:
        return None
    if _shares(rows):
        return _prefixed_trunk(model, rows, split, adapter)
    return Trunk(_capture(model, split, adapter, input_ids=rows.ids, attention_mask=rows.mask,
                          position_ids=_position_ids(rows.mask), use_cache=False))


def _prefixed_trunk(model, rows: forwards.PrefixedRows, split: int, adapter: Adapters) -> Optional[Trunk]:
    """:func:`run_trunk` of rows sharing prefixes: the start all the groups' prefixes share (the system
    prompt) runs once, each group's rest (its prompt) once on top of it, and the rows' own columns attend
    to their cached keys and values, as in :func:`forwards.prefixed_hidden`. None, the backbone marked so
    that :func:`shared_trunk` lays rows out unshared from then on, when the model's cache is not a plain
    key/value store (sliding windows, linear attention) or the layer returns no plain tensor (a tuple:
    the members could not replay the prefix's part alone)."""
    backbone, _ = forwards._backbone_and_head(model)
    cache = _new_cache(backbone)
    top, rest, _, mask = forwards.prefix_levels(rows.prefix_ids, rows.prefix_mask)
    s, g = top.shape[1], rest.shape[0]
    outs = {}
    if forwards.plain_cache(cache):
        if s:
            outs["top"] = _capture(model, split, adapter, input_ids=top, attention_mask=mask[:1, :s],
                                   position_ids=_position_ids(mask[:1, :s]), past_key_values=cache, use_cache=True)
            forwards.select_cache_rows(cache.layers[:split], torch.zeros(g, dtype=torch.long, device=top.device))
        if rest.shape[1]:
            outs["prefix"] = _capture(model, split, adapter, input_ids=rest, attention_mask=mask,
                                      position_ids=_position_ids(mask)[:, s:], past_key_values=cache, use_cache=True)
        below = cache.layers[:split]
        if all(torch.is_tensor(v) for v in outs.values()) and all(layer.is_initialized for layer in below):
            kv = [(layer.keys, layer.values) for layer in below]
            forwards.select_cache_rows(below, rows.group)
            full = torch.cat([mask[rows.group], rows.mask.long()], dim=1)
            out = _capture(model, split, adapter, input_ids=rows.ids, attention_mask=full,
                           position_ids=_position_ids(full)[:, mask.shape[1]:], past_key_values=cache,
                           use_cache=True)
            return Trunk(out, outs.get("prefix"), kv, outs.get("top"))
    backbone._rlhf_trunk_prefix = False
    return None


def shared_trunk(model, encoded: Sequence[tuple[list[int], int]], pad_id: int, split: int, adapter: Adapters,
                 groups: Optional[Sequence] = None) -> tuple[forwards.PrefixedRows, Optional[Trunk]]:
    """Rows ``(ids, response_start)`` laid out for the members (:func:`forwards.prefixed_rows`: prefixes
    shared by ``groups`` where the model can, else none) and their trunk below ``split``
    (:func:`run_trunk`; None when ``split`` is 0)."""
    device = next(model.parameters()).device
    backbone, _ = forwards._backbone_and_head(model)
    share = forwards.SHARE_PREFIXES and vars(backbone).get("_rlhf_trunk_prefix", True)
    rows = forwards.prefixed_rows(encoded, pad_id, device, groups, share)
    trunk = run_trunk(model, rows, split, adapter)
    if trunk is None and split > 0:  # the trunk could not serve the prefixes
        rows = forwards.prefixed_rows(encoded, pad_id, device, groups, share=False)
        trunk = run_trunk(model, rows, split, adapter)
    return rows, trunk


def _replayed(stack: torch.nn.ModuleList, split: int, output):
    """Layers ``0..split-1`` return the trunk's recorded ``output`` instead of computing: the layer at
    ``split`` then reads the shared hidden states, and the model builds masks and positions as usual."""
    return _instance_forwards(stack[:split], lambda layer: lambda *args, **kwargs: output)


@contextlib.contextmanager
def _instance_forwards(modules, make) -> Iterator[None]:
    """Within the block each of ``modules`` runs ``make(module)`` as its forward; after it, the forward
    it had (its class's, or an instance forward set before, e.g. :mod:`pipeline.models.lean_ops`')."""
    modules = list(modules)
    saved = [vars(m).get("forward") for m in modules]
    for m in modules:
        m.forward = make(m)
    try:
        yield
    finally:
        for m, fwd in zip(modules, saved):
            if fwd is None:
                del m.forward
            else:
                m.forward = fwd


def member_hidden(model, rows: forwards.PrefixedRows, split: int, trunk: Optional[Trunk],
                  adapter: Adapters) -> torch.Tensor:
    """Final hidden states (B, S, H) of the rows' own columns (``rows.ids``) with only ``adapter``
    active, the layers below ``split`` replayed from ``trunk`` (:func:`run_trunk`); equal to a full
    forward of the whole rows with that adapter to float round-off. With ``split`` 0 this is
    :func:`forwards.prefixed_hidden`."""
    backbone, _ = forwards._backbone_and_head(model)
    with stacking.active_adapters(model, _names(adapter)), loading.compute_context(model):
        if split <= 0:
            return forwards.prefixed_hidden(model, rows.prefix_ids, rows.prefix_mask, rows.ids, rows.mask, rows.group)
        _, stack = loading.decoder_layers(model)
        if _shares(rows):
            return _prefixed_member(backbone, stack, rows, split, trunk)
        with _replayed(stack, split, trunk.out):
            return backbone(input_ids=rows.ids, attention_mask=rows.mask, position_ids=_position_ids(rows.mask),
                            use_cache=False).last_hidden_state


def _prefixed_member(backbone, stack: torch.nn.ModuleList, rows: forwards.PrefixedRows, split: int,
                     trunk: Trunk, spans=None, group_counts: Optional[Sequence[int]] = None) -> torch.Tensor:
    """:func:`member_hidden` of rows sharing prefixes: the member's own layers run the trunk's two levels
    (the top once, each group's rest once), and every row of a group attends to their keys and values;
    with gradients on, the cache is part of the graph. With ``spans`` (:func:`members_hidden`), the rows
    and groups are k members' one after the other (``group_counts`` groups each): the top runs once per
    member, and each pass sets the spans' rows per member first."""
    cache = _new_cache(backbone)
    top, rest, _, mask = forwards.prefix_levels(rows.prefix_ids, rows.prefix_mask, trunk.top_length)
    s, g = top.shape[1], rest.shape[0]
    below = cache.layers[:split]
    k = 1 if spans is None else len(group_counts)
    # the top's row of each group: 0, or with k members, its member's
    top_of_group = torch.repeat_interleave(torch.arange(k, device=top.device),
                                           torch.tensor(list(group_counts or [g]), device=top.device))
    # The replayed layers write no keys, so the first pass sees an empty cache, as it must; before each
    # later pass they get the trunk's, which they never read: the pass's masks start after their length.
    if s:
        _set_counts(spans, [1] * k)
        with _replayed(stack, split, trunk.top.expand(k, -1, -1)):
            backbone(input_ids=top.expand(k, -1), attention_mask=mask[:1, :s].expand(k, -1),
                     position_ids=_position_ids(mask[:1, :s]).expand(k, -1), past_key_values=cache, use_cache=True)
        forwards.select_cache_rows(cache.layers[split:], top_of_group)
        for layer, (keys, values) in zip(below, trunk.kv):
            layer.update(keys[:, :, :s], values[:, :, :s])
    if rest.shape[1]:
        _set_counts(spans, group_counts)
        with _replayed(stack, split, trunk.prefix):
            backbone(input_ids=rest, attention_mask=mask, position_ids=_position_ids(mask)[:, s:],
                     past_key_values=cache, use_cache=True)
        for layer, (keys, values) in zip(below, trunk.kv):
            layer.update(keys[:, :, s:], values[:, :, s:])
    forwards.select_cache_rows(cache.layers[split:], rows.group)
    if spans is not None:
        spans.counts = torch.bincount(top_of_group[rows.group], minlength=k).tolist()
    full = torch.cat([mask[rows.group], rows.mask.long()], dim=1)
    with _replayed(stack, split, trunk.out):
        return backbone(input_ids=rows.ids, attention_mask=full, position_ids=_position_ids(full)[:, mask.shape[1]:],
                        past_key_values=cache, use_cache=True).last_hidden_state


def _set_counts(spans, counts) -> None:
    if spans is not None:
        spans.counts = list(counts)


def _batch_rows(out, rows: torch.Tensor, width: int):
    """Rows ``rows`` of a recorded layer output, its first ``width`` columns; None when it is neither a
    tensor nor a tuple led by one."""
    if torch.is_tensor(out):
        return out[rows, :width]
    if isinstance(out, tuple) and out and torch.is_tensor(out[0]):
        return (out[0][rows, :width], *out[1:])
    return None


def take_rows(rows: torch.Tensor, laid: forwards.PrefixedRows,
              trunk: Optional[Trunk]) -> Optional[tuple[forwards.PrefixedRows, Optional[Trunk]]]:
    """Rows ``rows`` of ``laid`` only, with their groups' prefixes and their part of ``trunk``, the rows'
    own columns cut to the longest of them and the prefixes' left padding to the longest kept prefix: a
    member whose bootstrap multiplicity of a pair is 0 need not run its own layers on it (about 1/e of the
    pairs), and the padding the dropped rows forced goes too. Exact: a row's hidden states do not depend
    on other rows or on padding. None when the recorded trunk output is neither a tensor nor a tuple led
    by one (then run every row)."""
    taken = _take([rows], laid, trunk)
    return None if taken is None else taken[:2]


def _take(member_rows: Sequence[torch.Tensor], laid: forwards.PrefixedRows, trunk: Optional[Trunk]):
    """:func:`take_rows` of each of ``member_rows`` in turn, stacked into one batch, each part with groups
    of its own (a group kept by two parts is there twice): ``(rows, trunk, groups per part)``."""
    kept, group, counts, offset = [], [], [], 0
    for rows in member_rows:
        k, g = torch.unique(laid.group[rows], return_inverse=True)
        kept.append(k)
        group.append(g + offset)
        counts.append(len(k))
        offset += len(k)
    rows, kept = torch.cat(list(member_rows)), torch.cat(kept)
    width = int(laid.mask[rows].sum(dim=1).max().item())
    prefix_mask = laid.prefix_mask[kept]
    start = prefix_mask.shape[1] - int(prefix_mask.sum(dim=1).max().item())
    sub = forwards.PrefixedRows(laid.prefix_ids[kept, start:], prefix_mask[:, start:], laid.ids[rows, :width],
                                laid.mask[rows, :width], torch.cat(group), laid.pool[rows, :width], laid.last[rows])
    if trunk is None:
        return sub, None, counts
    out = _batch_rows(trunk.out, rows, width)
    if out is None:
        return None
    if not trunk.kv:
        return sub, Trunk(out), counts
    # the prefixes' left padding that went is the rests' (the top has none): their first ``start`` columns
    s = trunk.top_length
    kv = [(torch.cat([k[kept, :, :s], k[kept, :, s + start:]], dim=2),
           torch.cat([v[kept, :, :s], v[kept, :, s + start:]], dim=2)) for k, v in trunk.kv]
    prefix = trunk.prefix[kept, start:] if trunk.prefix is not None else None
    return sub, Trunk(out, prefix, kv, trunk.top), counts


def members_hidden(model, laid: forwards.PrefixedRows, split: int, trunk: Optional[Trunk], adapters: Sequence[str],
                   member_rows: Sequence[torch.Tensor]) -> Optional[list[tuple[torch.Tensor, forwards.PrefixedRows]]]:
    """:func:`member_hidden` of every member at once: member m (``adapters[m]``) on rows ``member_rows[m]``
    of ``laid`` (as :func:`take_rows` cuts them), all members' rows stacked into one batch for the layers
    from ``split`` up, each LoRA linear there applying member m's adapter to member m's rows only
    (:func:`pipeline.models.lean_ops.member_rows_forward`): the frozen weights' matmuls run once over every
    member's rows instead of once per member, on k times the rows. Each member's prefixes run on its own
    rows of the cache (its layers give them other keys and values). Per member ``(hidden (B_m, S, H), its
    rows)``, equal to :func:`member_hidden` of its cut to float round-off; with gradients on, each
    member's LoRA weights get the gradient of its rows only. None where this cannot run (no trunk, a layer
    that returns no plain tensor, a LoRA linear the mixed forward does not cover): then loop over
    :func:`member_hidden`."""
    if not BATCH_MEMBERS or split <= 0 or trunk is None:
        return None
    _, stack = loading.decoder_layers(model)
    linears = [m for layer in stack[split:] for m in layer.modules() if lean_ops.is_peft_lora_linear(m)]
    if not linears or not all(lean_ops.covers_member_rows(m, adapters) for m in linears):
        return None
    taken = _take(member_rows, laid, trunk)
    if taken is None:
        return None
    rows, stacked, group_counts = taken
    backbone, _ = forwards._backbone_and_head(model)
    spans = lean_ops.MemberSpans(list(adapters))
    # the mixed forwards choose each row's adapter themselves; one member active keeps any other adapter on
    # the base (a policy's) out, as in member_hidden
    with _instance_forwards(linears, lambda m: lean_ops.member_rows_forward(m, spans)), \
            stacking.active_adapters(model, [adapters[0]]), loading.compute_context(model):
        if _shares(rows):
            hidden = _prefixed_member(backbone, stack, rows, split, stacked, spans, group_counts)
        else:
            spans.counts = [len(r) for r in member_rows]
            with _replayed(stack, split, stacked.out):
                hidden = backbone(input_ids=rows.ids, attention_mask=rows.mask,
                                  position_ids=_position_ids(rows.mask), use_cache=False).last_hidden_state
    out, at = [], 0
    for r in member_rows:
        part = slice(at, at + len(r))
        out.append((hidden[part], forwards.PrefixedRows(rows.prefix_ids, rows.prefix_mask, rows.ids[part],
                                                        rows.mask[part], rows.group[part], rows.pool[part],
                                                        rows.last[part])))
        at += len(r)
    return out


# ---------------------------------------------------------------------------------------------
# Responses over a shared trunk (PPO)


@dataclass
class SharedRows:
    """Rows of prompt + response laid out for the trunk (:func:`response_trunk`): ``laid`` (own columns
    from the prompt's last token, which predicts the first response token), ``trunk`` (below ``split``)."""
    laid: forwards.PrefixedRows
    trunk: Trunk
    split: int

    def take(self, rows: torch.Tensor) -> Optional["SharedRows"]:
        """Rows ``rows`` only (:func:`take_rows`); None where the trunk's output cannot be cut."""
        cut = take_rows(rows, self.laid, self.trunk)
        return None if cut is None else SharedRows(*cut, self.split)


def response_rows(query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor,
                  response_mask: torch.Tensor) -> list[tuple[list[int], int]]:
    """Left-padded prompts (B, P) and right-padded responses (B, T) as rows ``(ids, start)`` of
    :func:`forwards.prefixed_rows`: each prompt's real tokens and its response's, ``start`` at the
    prompt's last token (the first position whose hidden state predicts a response token). E.g. prompt
    (0, 5, 6) with mask (0, 1, 1) and response (7, 8, 0) with mask (1, 1, 0): ((5, 6, 7, 8), 1)."""
    rows = []
    for q, qm, r, rm in zip(query_ids.tolist(), query_mask.tolist(), response_ids.tolist(), response_mask.tolist()):
        prompt = [t for t, k in zip(q, qm) if k]
        rows.append((prompt + [t for t, k in zip(r, rm) if k], len(prompt) - 1))
    return rows


def response_trunk(model, query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor,
                   response_mask: torch.Tensor, split: int, adapter: Adapters,
                   pad_id: int = 0) -> Optional[SharedRows]:
    """The trunk below ``split`` over rows of prompt + response, run once without gradients
    (:func:`run_trunk`) with ``adapter`` active (every adapter set that agrees with it below ``split``
    can then replay it), the start all prompts share (the system prompt) once. None when ``split`` is 0
    or the trunk cannot be recorded (then run the plain path, :func:`forwards.forward_response`)."""
    if split <= 0:
        return None
    laid, shared = shared_trunk(model, response_rows(query_ids, query_mask, response_ids, response_mask),
                                pad_id, split, adapter)
    return None if shared is None else SharedRows(laid, shared, split)


def response_hidden(model, rows: SharedRows, adapter: Adapters, t: int) -> torch.Tensor:
    """(B, t, H) final hidden states that predict response tokens 0..t-1 with ``adapter`` active, the
    trunk replayed (:func:`member_hidden`); positions past a row's last token repeat its last column
    (their logprobs are masked). Equal to :func:`forwards.forward_response`'s to float round-off."""
    hidden = member_hidden(model, rows.laid, rows.split, rows.trunk, adapter)
    first = rows.laid.pool.long().argmax(dim=1)
    cols = (first.unsqueeze(1) + torch.arange(t, device=first.device)).minimum(rows.laid.last.unsqueeze(1))
    return hidden.gather(1, cols.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


def response_forward(model, rows: SharedRows, adapter: Adapters, response_ids: torch.Tensor, temperature: float,
                     with_entropy: bool = False, with_hidden: bool = False) -> forwards.ForwardOut:
    """:func:`forwards.forward_response` of ``rows`` with ``adapter`` active, the trunk replayed: only the
    layers from ``rows.split`` up run (and train)."""
    h = response_hidden(model, rows, adapter, response_ids.shape[1])
    return forwards.response_outputs(model, h, response_ids, temperature, with_entropy, with_hidden)


def layer_states(model, split: int, adapter: Adapters, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """What decoder layer ``split - 1`` returns over rows ``input_ids`` (B, T), left- or right-padded
    (position ids count each row's real tokens, as :func:`forwards.final_hidden`), only ``adapter`` active;
    the layers above do not run. For :func:`replayed_final_hidden` of every adapter set that computes
    the same below ``split``."""
    return _capture(model, split, adapter, input_ids=input_ids, attention_mask=attention_mask,
                    position_ids=_position_ids(attention_mask), use_cache=False)


def replayed_final_hidden(model, split: int, states, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor) -> torch.Tensor:
    """:func:`forwards.final_hidden` (B, T, H) under the active adapters, with the layers below ``split``
    replayed from ``states`` (:func:`layer_states` of an adapter set that computes the same there, over the
    same rows): equal to the full forward to float round-off, for ``1 - split / layers`` of its work."""
    net = forwards.backbone(model)
    _, stack = loading.decoder_layers(model)
    with loading.compute_context(model), _replayed(stack, split, states):
        return net(input_ids=input_ids, attention_mask=attention_mask, position_ids=_position_ids(attention_mask),
                   use_cache=False).last_hidden_state


def differing_adapters(first: Optional[Sequence[str]], *others: Optional[Sequence[str]]) -> list[str]:
    """The adapters active in some but not all of the sets (None: the base, none active): below the
    lowest layer any of them holds (:func:`trunk_split`), the sets compute the same. E.g. ["sft"] and
    ["sft", "policy"]: ["policy"]; None and ["sft", "policy"]: ["sft", "policy"]."""
    sets = [set(first or [])] + [set(o or []) for o in others]
    return sorted(set.union(*sets) - set.intersection(*sets))


# ---------------------------------------------------------------------------------------------
# The trunk the sampler computed (eval's reference pass)


class StateTap:
    """While entered, keeps what decoder layer ``split - 1`` returns on each forward (its hidden states,
    (B, S, H)): :func:`pipeline.rl.rollout.decode` reads it after each of its forwards and assembles the
    sampled rows' trunk (:class:`SampledTrunk`). ``plain`` turns False when the layer returns neither a
    tensor nor a tuple led by one (nothing to replay then)."""

    def __init__(self, model, split: int):
        _, stack = loading.decoder_layers(model)
        self.layer = stack[split - 1]
        self.split = split
        self.plain = True
        self.last: Optional[torch.Tensor] = None
        self.prompt: Optional[torch.Tensor] = None
        self.steps: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.seen: list[Optional[torch.Tensor]] = []
        self._handle = None

    def __enter__(self) -> "StateTap":
        self._handle = self.layer.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def _hook(self, module, args, output) -> None:
        if isinstance(output, tuple) and output and torch.is_tensor(output[0]):
            output = output[0]
        if not torch.is_tensor(output):
            self.plain = False
        self.last = output if torch.is_tensor(output) else None
        self.seen.append(self.last)

    def take_prefill(self) -> Optional[torch.Tensor]:
        """What the layer returned on the prefill's start (:func:`pipeline.models.forwards.prefill_prompts`),
        (1, s, H), when that was its one pass (every row a distinct prompt: nothing but the shared start
        cached); else None."""
        seen, self.seen = self.seen, []
        return seen[0] if len(seen) == 1 and seen[0] is not None and seen[0].shape[0] == 1 else None

    def take_prompt(self) -> None:
        """The decode's first forward: the prompt columns it ran, every row."""
        self.prompt = self.last
        self.seen = []

    def take_step(self, rows: torch.Tensor) -> None:
        """A decode step's forward over batch rows ``rows`` (B',) of the output: one column each."""
        if self.last is not None:
            self.steps.append((rows, self.last[:, -1]))
        self.seen = []

    def states(self) -> Optional[torch.Tensor]:
        """(B, C + steps, H): the prompt's C columns, then one per decode step (rows that had left the
        batch: 0, past their stop token and masked); None when not plain."""
        if not self.plain or self.prompt is None:
            return None
        b, c, h = self.prompt.shape
        out = self.prompt.new_zeros((b, c + len(self.steps), h))
        out[:, :c] = self.prompt
        for t, (rows, column) in enumerate(self.steps):
            out[rows, c + t] = column
        return out


@dataclass
class SampledTrunk:
    """The trunk of sampled rows, as the sampler ran it (:func:`pipeline.rl.rollout.sample` with
    ``trunk_split``): ``states`` (B, C + T - 1, H), what decoder layer ``split - 1`` returned on the C
    prompt columns the decode's first forward ran (columns ``cached`` on of the prefilled layout,
    ``mask`` (B, cached + C), :func:`pipeline.models.forwards.prefill_prompts`) and on response tokens
    0..T-2 (each predicts the next; the last one's state is never needed). Where the prefill ran only
    the start every row shares (``cached`` columns; PPO's rollouts, one sample of each prompt), also that
    start's ``top`` (1, cached, H) and its keys and values in each layer below the split, ``kv`` (1, heads,
    cached, head_dim) each, which a :class:`Trunk` of the rows is made of (:func:`sampled_shared_rows`)."""
    split: int
    mask: torch.Tensor
    cached: int
    states: torch.Tensor
    top: Optional[torch.Tensor] = None
    kv: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


@torch.no_grad()
def sampled_response_hidden(model, sampled: SampledTrunk, query_ids: torch.Tensor, query_mask: torch.Tensor,
                            response_ids: torch.Tensor, response_mask: torch.Tensor) -> Optional[torch.Tensor]:
    """(B, T, H) final hidden states predicting response tokens 0..T-1 under the active adapters, the layers
    below ``sampled.split`` replayed from what the sampler computed there: every adapter set that agrees
    with the sampler's below the split (the SFT reference of a policy with LoRA on the top layers only)
    runs only its layers above it. The prompt's shared start runs whole (its keys and values above the
    split are this model's own), as in :func:`pipeline.models.forwards.forward_response`, to whose
    hidden states these are equal to float round-off. None when this batch's prefill is laid out unlike
    the sampler's (then run that function)."""
    net = forwards.backbone(model)
    _, stack = loading.decoder_layers(model)
    t = response_ids.shape[1]
    with loading.compute_context(model):
        ids, mask, cache = forwards.prefill_prompts(model, query_ids, query_mask, 0)
        c = cache.get_seq_length() if cache is not None else 0
        if cache is None or c != sampled.cached or not torch.equal(mask.long(), sampled.mask.long()):
            return None
        states = sampled.states
        need = ids.shape[1] - c + t
        if states.shape[1] < need - 1:
            return None
        states = torch.cat([states[:, :need], states.new_zeros((states.shape[0], max(0, need - states.shape[1]),
                                                                 states.shape[2]))], dim=1)
        full_mask = torch.cat([mask.long(), response_mask.long()], dim=1)
        position_ids = (full_mask.cumsum(dim=1) - 1).clamp(min=0)
        with _replayed(stack, sampled.split, states):
            hidden = net(input_ids=torch.cat([ids[:, c:], response_ids], dim=1), attention_mask=full_mask,
                         position_ids=position_ids[:, c:], past_key_values=cache, use_cache=True).last_hidden_state
    q = ids.shape[1] - c
    return hidden[:, q - 1:q - 1 + t]


def sampled_shared_rows(model, sampled: SampledTrunk, query_ids: torch.Tensor, query_mask: torch.Tensor,
                        response_ids: torch.Tensor, response_mask: torch.Tensor,
                        pad_id: int = 0) -> Optional[SharedRows]:
    """:func:`response_trunk`'s rows made from what the sampler computed below ``sampled.split`` instead of
    running the trunk again: the same layout (:func:`shared_trunk`: the start every row shares as the one
    prefix, each row's own columns its prompt's rest and its response), the rows' states gathered from the
    sampler's columns (a row's rest sat left-padded before its response there), the prefix's from the
    prefill. None where the layouts do not line up (the prefill cached more than the shared start, or the
    layer returned no plain tensor); then run :func:`response_trunk`.

    E.g. a row whose rest is 2 tokens of the sampler's 3 prompt columns and whose response is 3 tokens:
    own columns 0, 1 <- sampler columns 1, 2; own 2, 3 <- 3, 4 (response tokens 0, 1); own 4 (the last
    response token, whose state nothing reads) <- 0."""
    if sampled.top is None or not sampled.kv or len(sampled.kv) != sampled.split:
        return None
    device = query_ids.device
    backbone, _ = forwards._backbone_and_head(model)
    share = forwards.SHARE_PREFIXES and vars(backbone).get("_rlhf_trunk_prefix", True)
    laid = forwards.prefixed_rows(response_rows(query_ids, query_mask, response_ids, response_mask), pad_id, device,
                                  None, share)
    s = laid.prefix_ids.shape[1]
    if s == 0 or s != sampled.cached or sampled.top.shape[1] != s or laid.prefix_ids.shape[0] != 1:
        return None
    states = sampled.states
    b, width, hidden = states.shape
    c = sampled.mask.shape[1] - sampled.cached  # the prompt columns the decode's first forward ran
    rest = sampled.mask[:, sampled.cached:].long().sum(dim=1, keepdim=True).to(device)
    if not torch.equal(rest.squeeze(1) + response_mask.long().sum(dim=1), laid.mask.long().sum(dim=1)):
        return None
    cols = torch.arange(laid.ids.shape[1], device=device).unsqueeze(0)
    src = torch.where(cols < rest, c - rest + cols, c + cols - rest).clamp(max=width)
    padded = torch.cat([states, states.new_zeros((b, 1, hidden))], dim=1)  # column ``width``: zeros
    out = padded.gather(1, src.unsqueeze(-1).expand(-1, -1, hidden))
    return SharedRows(laid, Trunk(out, None, list(sampled.kv), sampled.top), sampled.split)
