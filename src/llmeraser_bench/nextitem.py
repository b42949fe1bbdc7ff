"""Scoring the next-item task (``recsys.nextitem``; ``llmeraser bench --task next-item``).

Per method: ``hr1`` and ``valid_ratio`` by greedy decoding on the test prompts (the answer rule of
``recsys.nextitem``; an ensemble decodes greedily from the mixture of its members' next-token distributions),
and, as for the other tasks, ``loss_old`` / ``loss_new`` (the edited prompts' training-set and corrected
versions), ``loss_test``, the membership attacks on the old versions, and ``kl_test`` / ``kl_edited`` to the
retrained model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from llmeraser.adapter import AdapterParameters
from llmeraser_bench.metrics import EvalSets, SetPredictions, shared_metrics
from llmeraser_bench.pii import greedy_answers
from llmeraser_bench.recsys.nextitem import candidate_titles_of, hit_ratio_at_1


@torch.no_grad()
def mixture_greedy_answers(model: Any, tokenizer: Any, prompts: Sequence[str], thetas: Sequence[Tensor],
                           max_new_tokens: int) -> list[str]:
    """Greedy continuations under the equal-weight mixture of the model under each θ (one θ: ``generate``);
    decoding stops at EOS. Each θ keeps its own key/value cache (built under that θ only), so a new token costs
    one single-token forward pass per θ instead of a pass over the whole prompt. The model's own θ is restored."""
    params = AdapterParameters.of(model)
    original = params.flat()
    try:
        if len(thetas) == 1:
            params.assign(thetas[0])
            return greedy_answers(model, tokenizer, prompts, max_new_tokens)
        answers = []
        for prompt in prompts:
            step = tokenizer(prompt, return_tensors="pt", add_special_tokens=True)["input_ids"]
            caches: list[Any] = [None] * len(thetas)
            tokens: list[int] = []
            for _ in range(max_new_tokens):
                parts = []
                for k, theta in enumerate(thetas):
                    params.assign(theta)
                    out = model(input_ids=step, past_key_values=caches[k], use_cache=True)
                    caches[k] = out.past_key_values
                    parts.append(torch.log_softmax(out.logits[0, -1].double(), dim=-1))
                token = int(torch.logsumexp(torch.stack(parts), dim=0).argmax())
                if token == tokenizer.eos_token_id:
                    break
                tokens.append(token)
                step = torch.tensor([[token]])
            answers.append(tokenizer.decode(tokens, skip_special_tokens=True))
        return answers
    finally:
        params.assign(original)


def answer_budget(tokenizer: Any, candidates: Sequence[Sequence[str]]) -> int:
    """New tokens enough for the longest candidate title (with its leading space) and one more."""
    return 1 + max(len(tokenizer(" " + title, add_special_tokens=False)["input_ids"])
                   for titles in candidates for title in titles)


def score_next_item(
    model: Any, tokenizer: Any, thetas: Sequence[Tensor], sets: EvalSets, predictions: SetPredictions,
    reference: SetPredictions, max_length: int,
) -> dict[str, float]:
    """The metrics of the module docstring."""
    candidates = [candidate_titles_of(e.prompt) for e in sets.test]
    outputs = mixture_greedy_answers(model, tokenizer, [e.prompt for e in sets.test], thetas,
                                     answer_budget(tokenizer, candidates))
    n_old = len(sets.old)
    edited_losses = predictions.edited.losses()
    metrics = {**hit_ratio_at_1(outputs, candidates, [e.response.strip() for e in sets.test]),
               **shared_metrics(sets, predictions, reference)}
    if sets.new:
        metrics["loss_new"] = float(edited_losses[n_old:].mean())
    return metrics
