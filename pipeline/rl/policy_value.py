"""The trained parts of a PPO-family run behind one ``forward``, the module DDP wraps: the policy
adapter's logprobs and entropies and, for ``ppo.algorithm: ppo``, the value model's estimates.

Adapter names on the one base: ``sft`` (frozen, stacked under the policy), ``policy`` (trained),
``value`` (trained, ``ppo.value_model: adapter`` only).
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from pipeline.models import forwards, stacking, trunk

POLICY, VALUE, SFT = "policy", "value", "sft"


class PolicyValue(nn.Module):
    """The trained parts behind one ``forward`` (what DDP wraps): logprobs, entropy and values
    (None without a value model: ``with_value=False``, the critic-free estimators)."""

    def __init__(self, peft_model, hidden_size: int, policy_adapters: list[str],
                 value_adapters: Optional[list[str]], with_value: bool = True):
        super().__init__()
        self.peft_model = peft_model
        self.value_head = nn.Linear(hidden_size, 1) if with_value else None
        if self.value_head is not None:
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
        self.policy_adapters = policy_adapters
        self.value_adapters = value_adapters  # None: the head reads the policy's hidden states

    def forward(self, query, query_mask, response, response_mask, temperature: float, with_entropy: bool = False,
                shared: Optional[trunk.SharedRows] = None):
        """(logprobs, entropy or None, values or None), each (B, T). With ``shared`` (these rows' trunk,
        :func:`pipeline.models.trunk.response_trunk`) only the layers above the trunk run."""
        head_on_policy = self.value_head is not None and self.value_adapters is None

        def run(adapters, **kw):
            if shared is not None:
                return trunk.response_forward(self.peft_model, shared, adapters, response, temperature, **kw)
            with stacking.active_adapters(self.peft_model, adapters):
                return forwards.forward_response(self.peft_model, query, query_mask, response, response_mask,
                                                 temperature, **kw)

        out = run(self.policy_adapters, with_entropy=with_entropy, with_hidden=head_on_policy)
        if self.value_head is None:
            return out.logprobs, out.entropy, None
        hidden = out.hidden if head_on_policy else run(self.value_adapters, with_hidden=True).hidden
        values = self.value_head(hidden.float()).squeeze(-1)
        return out.logprobs, out.entropy, values

    def trainable_state(self) -> dict:
        """Detached copies of the parameters that train (what a failed step is put back to)."""
        return {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}
