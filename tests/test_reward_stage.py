"""Reward stage metrics: held-out accuracy against labels and gold, with counts and standard errors."""
import math

import pytest


class _TableScorer:
    """Stands in for RewardModelScorer: a response's score is looked up in a table."""

    def __init__(self, table):
        self.table = table

    def encode(self, prompts, responses, prompt_messages=None):
        return list(responses)

    def score_ids(self, seqs, progress=None):
        import torch

        return torch.tensor([self.table[s] for s in seqs])


def test_pair_metrics_accuracy_against_labels_and_gold_with_se():
    from pipeline.stages.reward import pair_metrics

    scorer = _TableScorer({"a": 1.0, "b": 0.0, "c": 2.0, "d": 3.0, "e": 0.5, "f": 0.4})
    rows = [{"prompt": [{"role": "user", "content": "p"}], "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]} for c, r in (("a", "b"), ("c", "d"), ("e", "f"))]
    # margins: a-b = 1 (right), c-d = -1 (wrong), e-f = 0.1 (right) -> accuracy 2/3
    # gold (chosen, rejected): pair 2 was a flipped label (gold prefers the rejected d), pair 3 is a near-tie
    gold = [(0.9, 0.1), (0.2, 0.8), (0.50, 0.48)]
    m = pair_metrics(scorer, rows, gold, gold_min_gap=0.05)
    assert m["accuracy"] == pytest.approx(2 / 3) and m["accuracy_n"] == 3
    assert m["accuracy_se"] == pytest.approx(math.sqrt(2 / 3 * 1 / 3 / 3))  # 0.2722
    assert m["margin"] == pytest.approx(0.1 / 3)
    # against gold, pair 3 (gap 0.02 < 0.05) is left out: pair 1 right, pair 2 right (d > c and gold says d)
    assert (m["accuracy_vs_gold"], m["accuracy_vs_gold_n"], m["accuracy_vs_gold_se"]) == (1.0, 2, 0.0)
    # a gap of exactly the threshold counts (gold is rounded to 4 decimals in the data)
    m = pair_metrics(scorer, rows, [(0.9, 0.1), (0.2, 0.8), (0.53, 0.48)], gold_min_gap=0.05)
    assert m["accuracy_vs_gold_n"] == 3


def test_mean_pool_averages_the_masked_positions_in_float32():
    import torch

    from pipeline.models.forwards import mean_pool

    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]],
                           [[1.0, 1.0], [2.0, 2.0], [9.0, 9.0]]], dtype=torch.bfloat16)
    mask = torch.tensor([[1, 0, 1], [0, 0, 0]])
    out = mean_pool(hidden, mask)
    # row 0: ((1 + 5) / 2, (2 + 6) / 2) = (3, 4); row 1 pools nothing -> zeros
    assert out.dtype == torch.float32 and out.tolist() == [[3.0, 4.0], [0.0, 0.0]]


def test_pairwise_loss_and_lr_schedule_by_hand():
    import torch

    from pipeline.models.reward_model import pairwise_loss
    from pipeline.stages.reward import lr_at

    # margins 2 and 0: (-log sigmoid(2) - log sigmoid(0)) / 2 = (0.126928 + 0.693147) / 2 = 0.410038
    loss = pairwise_loss(torch.tensor([2.0, 1.0]), torch.tensor([0.0, 1.0]))
    assert loss.item() == pytest.approx(0.410038, abs=1e-6)
    # centring adds 0.5 * mean((2 + 0)^2, (1 + 1)^2) = 0.5 * 4 = 2
    assert pairwise_loss(torch.tensor([2.0, 1.0]), torch.tensor([0.0, 1.0]), 0.5).item() == pytest.approx(2.410038, abs=1e-6)
    # total 10, warm-up 2: steps 0, 1 ramp 1/3, 2/3; then cosine from 1 at step 2 to 0 at step 10
    assert [round(lr_at(s, 10, 2, "cosine"), 4) for s in (0, 1, 2, 6, 10)] == [0.3333, 0.6667, 1.0, 0.5, 0.0]
    assert lr_at(6, 10, 2, "linear") == 0.5 and lr_at(9, 10, 0, "constant") == 1.0


def test_encode_conversation_keeps_the_response_when_cutting(tiny_path):
    from pipeline.models.loading import load_tokenizer
    from pipeline.models.reward_model import encode_conversation

    tok = load_tokenizer(tiny_path)
    conv = [{"role": "user", "content": "Tell me about a sunny beach day with friends and family."}]
    ids, start, cut = encode_conversation(tok, conv, "It is wonderful!", 10_000)
    prompt = tok.apply_chat_template(conv, tokenize=True, add_generation_prompt=True, return_dict=False)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    assert not cut and start == len(prompt) and ids[:start] == prompt
    short, s2, cut2 = encode_conversation(tok, conv, "It is wonderful!", len(ids) - 5)
    # five tokens gone from the left: the response and its start index move with them
    assert cut2 and short == ids[5:] and s2 == start - 5


def test_response_lengths_and_pair_order():
    import torch

    from pipeline.data.batching import length_grouped_order
    from pipeline.stages.reward import pair_order, response_lengths

    # ((9 ids, response from 5), (7 ids, from 5)): responses of 4 and 2 tokens, the pair pads to 4
    pairs = [((list(range(9)), 5), (list(range(7)), 5)), ((list(range(6)), 2), (list(range(12)), 2))]
    assert response_lengths(pairs) == [4, 10]
    # no keys: the plain shuffle the stage drew before grouping existed, from the same generator state
    assert pair_order(5, torch.Generator().manual_seed(3), None, 2) == \
        torch.randperm(5, generator=torch.Generator().manual_seed(3)).tolist()
    # keys: a grouped order seeded by one draw of the generator, so a saved generator state redraws it
    keys = [1, 9, 2, 8, 5, 5]
    g = torch.Generator().manual_seed(3)
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=torch.Generator().manual_seed(3)))
    assert pair_order(6, g, keys, 2) == length_grouped_order(keys, 2, seed)
    # the generator moved on by that one draw: the next epoch's order comes from the next draw
    h = torch.Generator().manual_seed(3)
    torch.randint(0, 2 ** 62, (1,), generator=h)
    assert torch.equal(g.get_state(), h.get_state())
