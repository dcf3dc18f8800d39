"""A trained reward model (LoRA adapter + linear score head on the base) as a scorer any stage can use:
encoding a conversation and its response, pooling the final hidden states, scoring on its own base or
attached as one more adapter to an already loaded policy base, and the pairwise loss it is trained with.

The head reads the final hidden states **averaged over the response tokens** (``reward.pooling:
mean``); reward models from before mean pooling (last-token, recorded in their manifest) still load and
score as they were trained.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch

from pipeline.artifacts.outputs import ArtifactError, is_complete, read_manifest
from pipeline.config import LoraConfigSection, ModelConfig
from pipeline.models import ensemble, forwards, loading, stacking, trunk

REWARD_ADAPTER = "reward"


POOLINGS = ("mean", "last")


def encode_conversation(tokenizer, conv: list[dict], response: str,
                        max_length: Optional[int]) -> tuple[list[int], int, bool]:
    """Token ids of ``conv`` + the assistant ``response`` (chat template), the index where the response
    starts, and whether the row was cut: a row over ``max_length`` tokens (None: no limit) loses tokens
    from the left (the start of the prompt), so the response and the prompt's end are kept."""
    full = tokenizer.apply_chat_template(conv + [{"role": "assistant", "content": response}], tokenize=True,
                                         return_dict=False)
    prompt = tokenizer.apply_chat_template(conv, tokenize=True, add_generation_prompt=True, return_dict=False)
    full = list(full["input_ids"] if hasattr(full, "keys") else full)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    start = len(prompt) if full[:len(prompt)] == prompt else len(full) - 1
    cut = max(len(full) - max_length, 0) if max_length is not None else 0
    return full[cut:], max(start - cut, 0), cut > 0


def pooled_features(model, encoded: Sequence[tuple[list[int], int]], pad_id: int, pooling: str,
                    groups: Optional[Sequence[int]] = None) -> torch.Tensor:
    """(B, H) float32 features the score head reads for rows ``(ids, response_start)``.

    Rows with the same ``groups`` entry (default: all rows one group) run the tokens they all begin with
    once (:func:`pipeline.models.forwards.prefixed_rows`, :func:`pipeline.models.forwards.prefixed_hidden`):
    the two sides of a preference pair share their prompt, every row its system prompt. The shared part
    stops before the earliest response start of its group, so every pooled position is a row's own; the
    features equal the plain forward's to float round-off."""
    device = next(model.parameters()).device
    rows = forwards.prefixed_rows(encoded, pad_id, device, groups)
    with loading.compute_context(model):
        hidden = forwards.prefixed_hidden(model, rows.prefix_ids, rows.prefix_mask, rows.ids, rows.mask, rows.group)
    return forwards.pool_hidden(hidden, rows.pool, rows.last, pooling)


def encode_rows(tokenizer, prompts: Sequence[str], responses: Sequence[str],
                prompt_messages: Optional[Sequence[list[dict]]], max_length: int) -> list[tuple[list[int], int]]:
    """``(ids, response start)`` of each (conversation, response): the conversation is
    ``prompt_messages[i]`` when given, else the user turn ``prompts[i]``."""
    out = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        conv = list(prompt_messages[i]) if prompt_messages is not None else [{"role": "user", "content": p}]
        ids, start, _ = encode_conversation(tokenizer, conv, r, max_length)
        out.append((ids, start))
    return out


@torch.no_grad()
def score_by_length(model, seqs: list[tuple[list[int], int]], batch_size: int, batch_fn, n_out: int,
                    progress: Optional[str] = None, by_prompt: bool = False) -> torch.Tensor:
    """(n_out, N) scores of encoded rows, in their order, the model in eval mode meanwhile. Batches are
    formed in order of length, so that a batch is not padded to one long row (a row's score does not
    depend on its padding); ``batch_fn(rows, groups)`` returns (n_out, len(rows)); ``progress`` names a
    bar. With ``by_prompt``, rows of the same prompt (the tokens before their response: eval's samples of
    a prompt, the two sides of a held-out pair) sit side by side, ordered by their prompt's longest row,
    and ``groups`` names each row's prompt, for the batch to run it once; else ``groups`` is None."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    # without by_prompt every row has the one key (), and the order is by length alone
    prompt = [tuple(ids[:start]) if by_prompt else () for ids, start in seqs]
    longest: dict[tuple, int] = {}
    for (ids, _), key in zip(seqs, prompt):
        longest[key] = max(longest.get(key, 0), len(ids))
    key_id = {key: i for i, key in enumerate(sorted(longest, key=lambda k: (longest[k], k)))}
    order = sorted(range(len(seqs)), key=lambda i: (key_id[prompt[i]], len(seqs[i][0])))
    scores = torch.empty(n_out, len(seqs))
    try:
        for s in tqdm(range(0, len(seqs), batch_size), desc=progress, unit="batch", disable=progress is None):
            idx = order[s:s + batch_size]
            groups = [key_id[prompt[i]] for i in idx] if by_prompt else None
            scores[:, idx] = batch_fn([seqs[i] for i in idx], groups).float().cpu()
    finally:
        model.train(was_training)
    return scores


# Rows per scoring forward (no gradients, so activations are small): eval's 128 samples of a model scored
# in 8.11 +- 0.24 s in batches of 32 against 9.25 +- 0.63 s in batches of 16, the same scores to 4e-5
# (float32, AMD EPYC under the AVX2 caps); 64 measured 7.82 +- 0.20 s, inside noise of 32.
SCORE_BATCH = 32


class RewardModelScorer:
    """A reward plugin (prompts, responses -> scores) backed by a LoRA reward adapter + linear head.

    The conversation is rendered with the chat template exactly as in training; the head reads the
    final hidden states pooled as the model was trained (``pooling``: mean over the response tokens,
    or the last token for reward models trained with trl's RewardTrainer).
    """

    def __init__(self, model, tokenizer, head_weight: torch.Tensor, head_bias: Optional[torch.Tensor] = None,
                 adapter: str = REWARD_ADAPTER, batch_size: int = SCORE_BATCH, max_length: int = 1024, pooling: str = "mean"):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.model = model
        self.tokenizer = tokenizer
        device = next(model.parameters()).device
        self.head_weight = head_weight.detach().to(device, torch.float32).reshape(1, -1)
        self.head_bias = None if head_bias is None else head_bias.detach().to(device, torch.float32)
        self.adapter = adapter
        self.batch_size = batch_size
        self.max_length = max_length
        self.pooling = pooling

    def encode(self, prompts: Sequence[str], responses: Sequence[str],
               prompt_messages: Optional[Sequence[list[dict]]] = None) -> list[tuple[list[int], int]]:
        return encode_rows(self.tokenizer, prompts, responses, prompt_messages, self.max_length)

    def score_ids(self, seqs: list[tuple[list[int], int]], progress: Optional[str] = None) -> torch.Tensor:
        """(N,) scores of encoded rows, in their order; ``progress`` names a progress bar."""
        def batch(rows, groups):
            v = pooled_features(self.model, rows, self.tokenizer.pad_token_id, self.pooling, groups) @ self.head_weight.T
            return (v + self.head_bias if self.head_bias is not None else v).T

        with stacking.active_adapters(self.model, [self.adapter]):
            return score_by_length(self.model, seqs, self.batch_size, batch, 1, progress, by_prompt=True)[0]

    def __call__(self, prompts, responses, prompt_messages=None, **info) -> list[float]:
        return self.score_ids(self.encode(prompts, responses, prompt_messages)).tolist()


class EnsembleScorer:
    """A reward plugin over several reward-model adapters on one base (:mod:`pipeline.models.ensemble`):
    each member's score standardised by its mean and std on the SFT policy's samples (recorded when it
    was trained), then combined by ``aggregate`` (mean, min or uwo with ``uwo_lambda``). The trunk below
    the members' lowest adapted layer runs once per batch for all of them. After each call,
    :meth:`details` gives each member's standardised scores and the members' disagreement (std), which
    the hosts log."""

    def __init__(self, model, tokenizer, members: Sequence[tuple[str, torch.Tensor, Optional[torch.Tensor]]],
                 mean: Sequence[float], std: Sequence[float], aggregate: str = "mean", uwo_lambda: float = 0.1,
                 batch_size: int = SCORE_BATCH, max_length: int = 1024, pooling: str = "mean", labels: Sequence[str] = ()):
        if aggregate not in ensemble.AGGREGATES:
            raise ValueError(f"aggregate must be one of {ensemble.AGGREGATES}, got {aggregate!r}")
        if not (isinstance(uwo_lambda, (int, float)) and uwo_lambda >= 0):
            raise ValueError(f"uwo_lambda must be a number >= 0, got {uwo_lambda!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.model, self.tokenizer = model, tokenizer
        device = next(model.parameters()).device
        self.adapters = [a for a, _, _ in members]
        self.heads = [(w.detach().to(device, torch.float32).reshape(1, -1),
                       None if b is None else b.detach().to(device, torch.float32)) for _, w, b in members]
        self.mean, self.std = list(mean), list(std)
        self.aggregate, self.uwo_lambda = aggregate, float(uwo_lambda)
        self.batch_size, self.max_length, self.pooling = batch_size, max_length, pooling
        self.labels = list(labels) or [f"member{i}" for i in range(len(members))]
        self.split = trunk.trunk_split(model, self.adapters)
        self._details: dict[str, list[float]] = {}

    def encode(self, prompts, responses, prompt_messages=None) -> list[tuple[list[int], int]]:
        return encode_rows(self.tokenizer, prompts, responses, prompt_messages, self.max_length)

    def member_scores_ids(self, seqs: list[tuple[list[int], int]], progress: Optional[str] = None) -> torch.Tensor:
        """(members, N) raw scores of encoded rows, in their order."""
        # Rows of one prompt side by side: the trunk and each member's layers run the system prompt once
        # per batch and each prompt once (forwards.prefix_levels).
        def batch(rows, groups):
            feats = ensemble.member_features(self.model, rows, self.tokenizer.pad_token_id, self.pooling,
                                             self.adapters, self.split, groups)
            return torch.cat([h @ w.T + (b if b is not None else 0) for h, (w, b) in zip(feats, self.heads)], dim=1).T

        return score_by_length(self.model, seqs, self.batch_size, batch, len(self.adapters), progress,
                               by_prompt=True)

    def standardised(self, raw: torch.Tensor) -> torch.Tensor:
        return ensemble.standardise(raw, self.mean, self.std)

    def combine(self, raw: torch.Tensor) -> torch.Tensor:
        """(N,) ensemble scores from the members' raw scores (members, N) (:meth:`member_scores_ids`):
        standardised, then aggregated; :meth:`details` then holds the members' part."""
        z = self.standardised(raw)
        self._details = {**{label: z[m].tolist() for m, label in enumerate(self.labels)},
                         "disagreement": ensemble.disagreement(z).tolist()}
        return ensemble.aggregate(z, self.aggregate, self.uwo_lambda)

    def score_ids(self, seqs: list[tuple[list[int], int]], progress: Optional[str] = None) -> torch.Tensor:
        """(N,) ensemble scores of encoded rows; :meth:`details` then holds the members' part."""
        return self.combine(self.member_scores_ids(seqs, progress))

    def __call__(self, prompts, responses, prompt_messages=None, **info) -> list[float]:
        return self.score_ids(self.encode(prompts, responses, prompt_messages)).tolist()

    def details(self) -> dict[str, list[float]]:
        """Per response, from the last call: each member's standardised score and the disagreement."""
        return dict(self._details)


def _head_from_state(state: dict[str, torch.Tensor], where: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    weight = next((v for k, v in state.items() if k.endswith("score.weight")), None)
    if weight is None:
        raise ArtifactError(f"{where}: no score head (score.weight) in the reward adapter")
    bias = next((v for k, v in state.items() if k.endswith("score.bias")), None)
    return weight, bias


def load_reward_scorer(path: str | Path, host=None, batch_size: int = SCORE_BATCH, members: Optional[Sequence[int]] = None,
                       aggregate: str = "mean", uwo_lambda: float = 0.1):
    """Serve a trained reward model (a RUN/reward folder, or a run folder containing reward/).

    ``host`` is ``(peft_model, tokenizer, base_info)`` of an already loaded model: when the reward
    model was trained on the same base (weights and tokenizer hashes), its adapter attaches to that
    model and no second base is loaded. Otherwise it loads its own base as its manifest describes.

    An ensemble (``reward.ensemble`` > 1) serves ``members`` (indices; default all) combined by
    ``aggregate`` (:class:`EnsembleScorer`); one member alone, e.g. one held out from the optimised
    ensemble to watch, scores raw, exactly as a single reward model does (:class:`RewardModelScorer`).
    """
    from peft import PeftModel

    path = Path(path)
    if not is_complete(path) and is_complete(path / "reward"):
        path = path / "reward"
    manifest = read_manifest(path)
    if manifest.get("stage") != "reward":
        raise ArtifactError(f"{path} is a '{manifest.get('stage')}' output, not a reward model")
    info = manifest.get("ensemble") or {}
    chosen = _members(members, int(info.get("members", 1)), path)
    if aggregate not in ensemble.AGGREGATES:
        raise ValueError(f"aggregate must be one of {ensemble.AGGREGATES}, got {aggregate!r}")
    folders = [path if m == 0 else path / ensemble.member_adapter(m) for m in chosen]
    names = [REWARD_ADAPTER if m == 0 else f"{REWARD_ADAPTER}_m{m}" for m in chosen]
    model = None
    if host is not None:
        model, tok, base = host
        trained_in = manifest["base"].get("quantization", {}).get("compute_dtype")
        used_in = base.quantization.get("compute_dtype")
        if trained_in and used_in and trained_in != used_in:
            # Measured: an fp32-trained reward model read bf16 hidden states with a ~0.12 offset.
            print(f"[reward] note: {path} was trained in {trained_in} and now scores in {used_in}; its scores "
                  "shift with the precision. Train the reward model in the precision PPO uses.", flush=True)
        if not (manifest["base"].get("weights_sha256") == base.weights_sha256
                and manifest["base"].get("tokenizer_sha256") == base.tokenizer_sha256
                and isinstance(model, PeftModel)):
            model = None
    placeholder = model is None
    if placeholder:
        mcfg = ModelConfig(**manifest["config"]["model"])
        base_model, tok, _ = loading.load_base(mcfg)
        from peft import get_peft_model

        # A placeholder adapter makes this a PeftModel; the reward adapters then attach by name.
        model = get_peft_model(base_model, loading.lora_config(
            LoraConfigSection(r=1, target_modules=["q_proj"])), adapter_name="unused")
    heads = vars(model).setdefault("_rlhf_reward_heads", {})
    for folder, name in zip(folders, names):
        if name not in model.peft_config:
            heads[name] = _head_from_state(stacking.attach_adapter(model, folder, name), str(folder))
    if placeholder:
        with warnings.catch_warnings():  # peft notes that the deleted placeholder was the active adapter
            warnings.simplefilter("ignore", UserWarning)
            model.delete_adapter("unused")
        if model.active_adapter not in model.peft_config:  # peft re-points it only when one adapter is left active
            model.active_adapter = names[0]
    kw = {"batch_size": batch_size, "max_length": _max_length(manifest), "pooling": _pooling(manifest)}
    if len(chosen) == 1:
        return RewardModelScorer(model, tok, *heads[names[0]], adapter=names[0], **kw)
    norm = info.get("normalization") or {}
    mean, std = norm.get("mean"), norm.get("std")
    if not (isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == int(info["members"])):
        raise ArtifactError(f"{path}: manifest.json has no per-member normalization for its ensemble")
    return EnsembleScorer(model, tok, [(n, *heads[n]) for n in names], [mean[m] for m in chosen],
                          [std[m] for m in chosen], aggregate, uwo_lambda, labels=[f"member{m}" for m in chosen], **kw)


def _members(members, k: int, path: Path) -> list[int]:
    """The member indices to serve: all ``k`` by default; each an int in [0, k), no repeats."""
    if members is None:
        return list(range(k))
    if isinstance(members, int) and not isinstance(members, bool):
        members = [members]
    chosen = list(members) if isinstance(members, (list, tuple)) else None
    if (not chosen or any(isinstance(m, bool) or not isinstance(m, int) or not 0 <= m < k for m in chosen)
            or len(set(chosen)) != len(chosen)):
        raise ValueError(f"members must be distinct member indices in [0, {k}) of the reward model at {path} "
                         f"(it has {k} member{'s' if k > 1 else ''}), got {members!r}")
    return chosen


def _max_length(manifest: dict) -> int:
    """The token limit the reward model was trained with: it scores under the same left-cut rule."""
    return int(manifest.get("config", {}).get("reward", {}).get("max_length", 1024))


def _pooling(manifest: dict) -> str:
    """How the saved reward model pools hidden states; "last" for models from before mean pooling."""
    pooling = manifest.get("pooling", "last")
    if pooling not in POOLINGS:
        raise ArtifactError(f"reward model pooling {pooling!r} is not one of {POOLINGS}")
    return pooling


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor, center: float = 0.0) -> torch.Tensor:
    """Bradley-Terry loss -log sigmoid(r_c - r_r), mean over pairs (Ouyang et al. 2022, eq. 1), plus
    ``center`` * mean((r_c + r_r)^2) to keep rewards near 0 (Eisenstein et al. 2023; trl's
    center_rewards_coefficient). Margins (2, 0): (-log sigmoid(2) - log sigmoid(0)) / 2 = (0.1269 + 0.6931) / 2."""
    loss = -torch.nn.functional.logsigmoid(chosen - rejected).mean()
    if center:
        loss = loss + center * ((chosen + rejected) ** 2).mean()
    return loss
