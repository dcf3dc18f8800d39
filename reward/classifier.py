"""Built-in reward from any transformers sequence-classification model."""

from __future__ import annotations

import inspect

__all__ = ["ClassifierReward"]


class ClassifierReward:
    """Score responses with an ``AutoModelForSequenceClassification`` model.

    The tokenizer and model are loaded once, in eval mode; scoring runs without grad.

    Args:
        model: local path or hub id of the model (its tokenizer must be saved with it).
        label: the class to score, by name (``config.label2id`` / ``id2label``) or index;
            default index 1 when the model has several labels, else 0.
        output: ``"prob"``: softmax probability of ``label`` (sigmoid of the single logit for a
            one-label model), or ``"logit"``: the raw logit.
        batch_size: rows per forward pass.
        max_length: inputs are truncated to this many tokens.
        device: torch device for the model, default ``"cpu"``.
        text: ``"response"`` scores the response alone; ``"prompt_response"`` encodes
            (prompt, response) as a text pair, as reward/NLI-style classifiers expect.
    """

    def __init__(self, model: str, label: int | str | None = None, output: str = "prob",
                 batch_size: int = 16, max_length: int = 512, device: str = "cpu",
                 text: str = "response"):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if output not in ("prob", "logit"):
            raise ValueError(f"output must be 'prob' or 'logit', got {output!r}")
        if text not in ("response", "prompt_response"):
            raise ValueError(f"text must be 'response' or 'prompt_response', got {text!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.model = AutoModelForSequenceClassification.from_pretrained(model).to(device).eval()
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise ValueError(f"the tokenizer of {model!r} has neither a pad nor an eos "
                                 "token, so batches cannot be padded")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # Decoder classifiers (e.g. Llama) find each row's last real token through
        # config.pad_token_id and refuse batches > 1 without it.
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        # Tokenizers may emit inputs (e.g. token_type_ids) that a given architecture rejects.
        self._inputs = set(inspect.signature(self.model.forward).parameters)
        self.label = self._resolve_label(label)
        self.output = output
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = device
        self.text = text

    def _resolve_label(self, label: int | str | None) -> int:
        config = self.model.config
        n = config.num_labels
        labels = ", ".join(f"{i}={config.id2label.get(i, i)}" for i in range(n))
        if label is None:
            return 1 if n > 1 else 0
        if isinstance(label, str):
            if label in config.label2id:
                return int(config.label2id[label])
            by_name = {name: int(i) for i, name in config.id2label.items()}
            if label in by_name:
                return by_name[label]
            raise ValueError(f"unknown label {label!r}; the model's labels are {labels}")
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < n:
            raise ValueError(f"label index {label!r} is out of range; the model's labels are "
                             f"{labels}")
        return label

    def __call__(self, prompts, responses, **info) -> list[float]:
        import torch

        scores: list[float] = []
        with torch.no_grad():
            for start in range(0, len(responses), self.batch_size):
                batch = list(responses[start:start + self.batch_size])
                texts = (batch,) if self.text == "response" else \
                    (list(prompts[start:start + self.batch_size]), batch)
                enc = self.tokenizer(*texts, padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt")
                inputs = {k: v.to(self.device) for k, v in enc.items() if k in self._inputs}
                logits = self.model(**inputs).logits.float()
                if self.output == "logit":
                    picked = logits[:, self.label]
                elif logits.shape[-1] == 1:
                    picked = torch.sigmoid(logits[:, 0])
                else:
                    picked = torch.softmax(logits, dim=-1)[:, self.label]
                scores.extend(picked.cpu().tolist())
        return scores
