"""Metrics: per-example losses, Yes/No answer scores and AUC, and function-space distances between adapters.

- loss: the per-example mean response NLL in nats per token (``llmeraser.data.response_nll``);
  perplexity = exp(mean loss).
- answer score: log P(positive answer | prompt) − log P(negative answer | prompt), the sums of the answer
  tokens' log-probabilities (EOS excluded); for single-token answers this is logit(Yes) − logit(No).
- AUC: ROC AUC of the answer scores against the true Yes/No labels (scikit-learn).
- membership-inference AUC: ROC AUC of −loss for members (label 1) against non-members (label 0).
- KL: mean over examples of the token-averaged KL(P_a ‖ P_b) of the next-token distributions on the
  response positions, between the same model under two adapter vectors θ_a, θ_b (nats per token).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from llmeraser.adapter import AdapterParameters
from llmeraser.data import (
    Example,
    TokenizationConfig,
    forward_logits,
    iter_batches,
    response_nll,
    shifted_targets,
    tokenize_examples,
)


@torch.no_grad()
def example_loss_values(
    model: Any, tokenizer: Any, examples: Sequence[Example], max_length: int = 256, batch_size: int = 8,
    loss_scope: str = "response",
) -> np.ndarray:
    """Per-example mean NLL of the loss tokens (``loss_scope``; nats per token), shape (n,)."""
    items = tokenize_examples(tokenizer, examples, TokenizationConfig(max_length=max_length, loss_scope=loss_scope))
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


def single_token_id(tokenizer: Any, text: str) -> int | None:
    """The token id of ``text`` when it tokenises (without special tokens) to exactly one token, else None."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return int(ids[0]) if len(ids) == 1 else None


@torch.no_grad()
def answer_scores(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    positive: str = " Yes",
    negative: str = " No",
    max_length: int = 256,
    batch_size: int = 8,
) -> np.ndarray:
    """log P(positive | prompt) − log P(negative | prompt) per example, shape (n,).

    When both answers are single tokens this is one forward pass (the answer position's log-softmax);
    otherwise two (each answer's summed token log-probabilities)."""
    prompts = [e.prompt for e in examples]
    pos_id, neg_id = single_token_id(tokenizer, positive), single_token_id(tokenizer, negative)
    if pos_id is None or neg_id is None:
        return answer_log_likelihoods(model, tokenizer, prompts, positive, max_length, batch_size) - (
            answer_log_likelihoods(model, tokenizer, prompts, negative, max_length, batch_size)
        )
    probes = [Example(str(i), prompt, positive) for i, prompt in enumerate(prompts)]
    items = tokenize_examples(tokenizer, probes, TokenizationConfig(max_length=max_length, append_eos=False))
    values = []
    for batch in iter_batches(items, batch_size, tokenizer.pad_token_id):
        logits, labels = forward_logits(model, batch)
        _, weights = shifted_targets(labels)
        first = (weights > 0).double().argmax(dim=1)  # the position predicting the (single) answer token
        log_p = torch.log_softmax(logits[torch.arange(len(first)), first].double(), dim=-1)
        values.append(log_p[:, pos_id] - log_p[:, neg_id])
    return torch.cat(values).numpy()


def binary_labels(examples: Sequence[Example], positive: str = " Yes") -> np.ndarray:
    """1 where the response is the positive answer (compared without surrounding whitespace), else 0."""
    return np.array([int(e.response.strip() == positive.strip()) for e in examples])


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC; NaN when only one class is present."""
    from sklearn.metrics import roc_auc_score

    if len(set(labels.tolist())) < 2:
        return float("nan")
    return float(roc_auc_score(labels, scores))


Thetas = Tensor | Sequence[Tensor]


def _as_list(thetas: Thetas) -> list[Tensor]:
    return [thetas] if isinstance(thetas, Tensor) else list(thetas)


def _mixture_log_probs(
    model: Any, params: AdapterParameters, batch: dict[str, Tensor], thetas: list[Tensor]
) -> tuple[Tensor, Tensor]:
    """Next-token log-probabilities (B, L'-1, V, float64) of the equal-weight mixture of the model under each
    θ in ``thetas`` (one θ: the model itself), and the aligned labels (B, L')."""
    parts = []
    for theta in thetas:
        params.assign(theta)
        logits, labels = forward_logits(model, batch)
        parts.append(torch.log_softmax(logits[:, :-1].double(), dim=-1))
    if len(parts) == 1:
        return parts[0], labels
    return torch.logsumexp(torch.stack(parts), dim=0) - math.log(len(parts)), labels


@dataclass
class ResponsePredictions:
    """Next-token log-probabilities on each example's response positions: ``log_probs[i]`` (T_i, V)
    float32 and the response tokens ``targets[i]`` (T_i,); position 0 predicts the first response token
    from the prompt alone. For a small evaluation set held in memory (the benchmark's)."""

    log_probs: list[Tensor]
    targets: list[Tensor]

    def losses(self) -> np.ndarray:
        """Per-example mean response NLL (nats per token), shape (n,)."""
        return np.array([-float(lp.double().gather(1, t[:, None]).mean()) for lp, t in zip(self.log_probs, self.targets)])

    def first_token_scores(self, positive_id: int, negative_id: int) -> np.ndarray:
        """log P(positive) − log P(negative) at the answer position, shape (n,): the Yes/No score when both
        answers are single tokens."""
        return np.array([float(lp[0, positive_id].double() - lp[0, negative_id].double()) for lp in self.log_probs])

    def kl_to(self, other: ResponsePredictions) -> np.ndarray:
        """Per-example token-averaged KL(self ‖ other) in nats per token, shape (n,)."""
        return np.array([
            float((p.double().exp() * (p.double() - q.double())).sum(-1).mean())
            for p, q in zip(self.log_probs, other.log_probs)
        ])

    def subset(self, indices: Sequence[int]) -> ResponsePredictions:
        return ResponsePredictions([self.log_probs[i] for i in indices], [self.targets[i] for i in indices])


@torch.no_grad()
def response_predictions(
    model: Any, tokenizer: Any, examples: Sequence[Example], thetas: Thetas, max_length: int = 256, batch_size: int = 8,
    loss_scope: str = "response",
) -> ResponsePredictions:
    """The equal-weight mixture of the model under ``thetas`` (one θ: the model itself) on the examples'
    response positions, one forward pass per batch and θ. The model's own θ is restored."""
    params = AdapterParameters.of(model)
    original = params.flat()
    items = tokenize_examples(tokenizer, examples, TokenizationConfig(max_length=max_length, loss_scope=loss_scope))
    log_probs: list[Tensor] = []
    targets_out: list[Tensor] = []
    try:
        for batch in iter_batches(items, batch_size, tokenizer.pad_token_id):
            log_p, labels = _mixture_log_probs(model, params, batch, _as_list(thetas))
            targets, weights = shifted_targets(labels)
            for row in range(len(log_p)):
                keep = weights[row] > 0
                log_probs.append(log_p[row, keep].float())
                targets_out.append(targets[row, keep])
    finally:
        params.assign(original)
    return ResponsePredictions(log_probs, targets_out)


@torch.no_grad()
def function_space_distance(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    theta_a: Thetas,
    theta_b: Thetas,
    max_length: int = 256,
    batch_size: int = 8,
    loss_scope: str = "response",
) -> dict[str, float]:
    """Distances between the model under θ_a and under θ_b on the examples' response positions:

    ``kl``: mean over examples of the token-averaged KL(P_θa ‖ P_θb) (nats per token);
    ``top1_agreement``: mean over examples of the fraction of response positions whose most likely
    next token is the same. A list of θ on either side stands for the equal-weight mixture of those
    models' next-token distributions (an ensemble such as SISA's). The model's own θ is restored.
    """
    params = AdapterParameters.of(model)
    original = params.flat()
    items = tokenize_examples(tokenizer, examples, TokenizationConfig(max_length=max_length, loss_scope=loss_scope))
    kl_total, agree_total = 0.0, 0.0
    try:
        for batch in iter_batches(items, batch_size, tokenizer.pad_token_id):
            log_p, labels = _mixture_log_probs(model, params, batch, _as_list(theta_a))
            log_q, _ = _mixture_log_probs(model, params, batch, _as_list(theta_b))
            _, weights = shifted_targets(labels)
            weights = weights.double()
            kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
            same = (log_p.argmax(dim=-1) == log_q.argmax(dim=-1)).double()
            kl_total += float((kl * weights).sum())
            agree_total += float((same * weights).sum())
    finally:
        params.assign(original)
    return {"kl": kl_total / len(items), "top1_agreement": agree_total / len(items)}


def membership_auc(member_losses: np.ndarray, nonmember_losses: np.ndarray) -> float:
    """Loss-based membership inference: ROC AUC of −loss at telling members (label 1) from non-members
    (label 0). 0.5: the attack cannot tell them apart; 1: members always have the lower loss."""
    labels = np.concatenate([np.ones(len(member_losses)), np.zeros(len(nonmember_losses))])
    return auc(labels, -np.concatenate([member_losses, nonmember_losses]))


def is_yes_no(examples: Sequence[Example], positive: str = " Yes", negative: str = " No") -> bool:
    """Whether every response is the positive or the negative answer (ignoring surrounding whitespace)."""
    answers = {positive.strip(), negative.strip()}
    return bool(examples) and all(e.response.strip() in answers for e in examples)


def evaluate_examples(
    model: Any, tokenizer: Any, examples: Sequence[Example], max_length: int = 256, batch_size: int = 8,
    loss_scope: str = "response",
) -> dict[str, float]:
    """``n``, ``mean_loss`` (nats per token), ``perplexity`` = exp(mean_loss); for Yes/No data also
    ``accuracy`` (score > 0 predicts Yes) and ``auc`` of the answer scores."""
    losses = example_loss_values(model, tokenizer, examples, max_length, batch_size, loss_scope)
    metrics = {"n": float(len(examples)), "mean_loss": float(losses.mean()), "perplexity": float(np.exp(losses.mean()))}
    if is_yes_no(examples):
        scores = answer_scores(model, tokenizer, examples, max_length=max_length, batch_size=batch_size)
        labels = binary_labels(examples)
        metrics["accuracy"] = float(((scores > 0).astype(int) == labels).mean())
        metrics["auc"] = auc(labels, scores)
    return metrics
