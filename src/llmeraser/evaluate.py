"""Metrics: per-example losses, Yes/No answer scores and AUC, and function-space distances between adapters.

- loss: the per-example mean response NLL in nats per token (``llmeraser.data.response_nll``);
  perplexity = exp(mean loss).
- answer score: log P(positive answer | prompt) − log P(negative answer | prompt), the sums of the answer
  tokens' log-probabilities (EOS excluded); for single-token answers this is logit(Yes) − logit(No).
- AUC: ROC AUC of the answer scores against the true Yes/No labels (scikit-learn).
- KL: mean over examples of the token-averaged KL(P_a ‖ P_b) of the next-token distributions on the
  response positions, between the same model under two adapter vectors θ_a, θ_b (nats per token).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from llmeraser.data import (
    Example,
    TokenizationConfig,
    iter_batches,
    forward_logits,
    response_nll,
    shifted_targets,
    tokenize_examples,
)
from llmeraser.model import AdapterParameters


@torch.no_grad()
def example_loss_values(
    model: Any, tokenizer: Any, examples: Sequence[Example], max_length: int = 256, batch_size: int = 8
) -> np.ndarray:
    """Per-example mean response NLL (nats per token), shape (n,)."""
    items = tokenize_examples(tokenizer, examples, TokenizationConfig(max_length=max_length))
    batches = iter_batches(items, batch_size, tokenizer.pad_token_id)
    values = [response_nll(*forward_logits(model, batch)) for batch in batches]
    return torch.cat(values).double().numpy()


@torch.no_grad()
def answer_log_likelihoods(
    model: Any, tokenizer: Any, prompts: Sequence[str], answer: str, max_length: int = 256, batch_size: int = 8
) -> np.ndarray:
    """log P(answer | prompt) summed over the answer's tokens (no EOS), shape (n,)."""
    examples = [Example(str(i), prompt, answer) for i, prompt in enumerate(prompts)]
    config = TokenizationConfig(max_length=max_length, append_eos=False)
    items = tokenize_examples(tokenizer, examples, config)
    values = []
    for batch in iter_batches(items, batch_size, tokenizer.pad_token_id):
        mean_nll = response_nll(*forward_logits(model, batch))
        counts = (batch["labels"][:, 1:] != -100).sum(dim=1)
        values.append(-(mean_nll * counts))
    return torch.cat(values).double().numpy()


def answer_scores(
    model: Any, tokenizer: Any, examples: Sequence[Example], positive: str = " Yes", negative: str = " No", **kwargs: Any
) -> np.ndarray:
    """log P(positive | prompt) − log P(negative | prompt) per example, shape (n,)."""
    prompts = [e.prompt for e in examples]
    return answer_log_likelihoods(model, tokenizer, prompts, positive, **kwargs) - answer_log_likelihoods(
        model, tokenizer, prompts, negative, **kwargs
    )


def binary_labels(examples: Sequence[Example], positive: str = " Yes") -> np.ndarray:
    """1 where the response is the positive answer (compared without surrounding whitespace), else 0."""
    return np.array([int(e.response.strip() == positive.strip()) for e in examples])


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC; NaN when only one class is present."""
    from sklearn.metrics import roc_auc_score

    if len(set(labels.tolist())) < 2:
        return float("nan")
    return float(roc_auc_score(labels, scores))


@torch.no_grad()
def function_space_distance(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    theta_a: Tensor,
    theta_b: Tensor,
    max_length: int = 256,
    batch_size: int = 8,
) -> dict[str, float]:
    """Distances between the model under θ_a and under θ_b on the examples' response positions:

    ``kl``: mean over examples of the token-averaged KL(P_θa ‖ P_θb) (nats per token);
    ``top1_agreement``: mean over examples of the fraction of response positions whose most likely
    next token is the same. The model's own θ is restored afterwards.
    """
    params = AdapterParameters.of(model)
    original = params.flat()
    items = tokenize_examples(tokenizer, examples, TokenizationConfig(max_length=max_length))
    kl_total, agree_total = 0.0, 0.0
    try:
        for batch in iter_batches(items, batch_size, tokenizer.pad_token_id):
            params.assign(theta_a)
            logits_p, labels = forward_logits(model, batch)
            params.assign(theta_b)
            logits_q, _ = forward_logits(model, batch)
            log_p = torch.log_softmax(logits_p[:, :-1].double(), dim=-1)
            log_q = torch.log_softmax(logits_q[:, :-1].double(), dim=-1)
            _, weights = shifted_targets(labels)
            weights = weights.double()
            kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
            same = (log_p.argmax(dim=-1) == log_q.argmax(dim=-1)).double()
            kl_total += float((kl * weights).sum())
            agree_total += float((same * weights).sum())
    finally:
        params.assign(original)
    return {"kl": kl_total / len(items), "top1_agreement": agree_total / len(items)}


def is_yes_no(examples: Sequence[Example], positive: str = " Yes", negative: str = " No") -> bool:
    """Whether every response is the positive or the negative answer (ignoring surrounding whitespace)."""
    answers = {positive.strip(), negative.strip()}
    return bool(examples) and all(e.response.strip() in answers for e in examples)


def evaluate_examples(
    model: Any, tokenizer: Any, examples: Sequence[Example], max_length: int = 256, batch_size: int = 8
) -> dict[str, float]:
    """``n``, ``mean_loss`` (nats per token), ``perplexity`` = exp(mean_loss); for Yes/No data also
    ``accuracy`` (score > 0 predicts Yes) and ``auc`` of the answer scores."""
    losses = example_loss_values(model, tokenizer, examples, max_length, batch_size)
    metrics = {"n": float(len(examples)), "mean_loss": float(losses.mean()), "perplexity": float(np.exp(losses.mean()))}
    if is_yes_no(examples):
        scores = answer_scores(model, tokenizer, examples, max_length=max_length, batch_size=batch_size)
        labels = binary_labels(examples)
        metrics["accuracy"] = float(((scores > 0).astype(int) == labels).mean())
        metrics["auc"] = auc(labels, scores)
    return metrics
