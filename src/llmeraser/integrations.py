"""Training integrations: a ``transformers.TrainerCallback`` that writes llmeraser's training record from a
Hugging Face ``Trainer`` (or TRL ``SFTTrainer``) run, so that the adapter it trains is erased with its own
recipe and checked against its base model and data, with no extra flags."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from llmeraser.adapter import LoraSettings
from llmeraser.atomic import write_text_atomic
from llmeraser.data import LOSS_SCOPES, Example, examples_from_rows, read_examples
from llmeraser.hashing import combine_parts, dataset_hash, fingerprint_parts
from llmeraser.provenance import ORIGIN_CALLBACK, TRAINING_RECORD, TrainingRecord
from llmeraser.train import TrainConfig


def effective_l2(optimizer: Any, params: Sequence[Any], weight_decay: float) -> float:
    """The L2 coefficient λ that stands for AdamW's decoupled decay ``weight_decay`` at the end of a run.

    AdamW steps θ ← θ − lr·(m̂/(√v̂ + ε) + wd·θ): its fixed point has ∇L(θ) = −wd·(√v̂ + ε)⊙θ, the gradient of
    a per-coordinate L2 term ½ Σ wd·(√v̂_j + ε)·θ_j². llmeraser's objective has one coefficient,
    R(θ) = L(θ) + (λ/2)‖θ‖²; λ is the least-squares fit of wd·(√v̂ + ε)⊙θ by λ·θ:
    λ = wd · Σ_j (√v̂_j + ε) θ_j² / Σ_j θ_j², from the optimiser's second-moment state (v̂ bias-corrected)."""
    import torch

    if not weight_decay:
        return 0.0
    numerator, denominator = 0.0, 0.0
    for group in optimizer.param_groups:
        beta2, eps = group.get("betas", (0.9, 0.999))[1], group.get("eps", 1e-8)
        for tensor in group["params"]:
            state = optimizer.state.get(tensor, {})
            if "exp_avg_sq" not in state or not any(tensor is p for p in params):
                continue
            step = float(state.get("step", 1))
            v_hat = state["exp_avg_sq"] / (1.0 - beta2 ** max(step, 1.0))
            theta2 = tensor.detach().to(torch.float64) ** 2
            numerator += float(((v_hat.to(torch.float64).sqrt() + eps) * theta2).sum())
            denominator += float(theta2.sum())
    if denominator == 0.0:
        raise ValueError("no AdamW second-moment state for the adapter's tensors: pass weight_decay= (the L2 "
                         "coefficient) to LlmeraserCallback")
    return weight_decay * numerator / denominator


class LlmeraserCallback(TrainerCallback):
    """Write ``llmeraser_training.json`` (the training record ``llmeraser erase`` reads) into the run's output
    directory at the end of training, and into each checkpoint the ``Trainer`` saves.

    ``train_data``: the examples the run trained on, before tokenisation (a data file, llmeraser
    ``Example`` s, a list of dicts or a ``datasets.Dataset`` in a layout llmeraser reads): their hash and count
    are recorded, and ``erase --data`` must then give the same. ``loss_scope``: which tokens carried the loss
    (``response``, ``assistant``, ``all``); None reads it from a TRL ``SFTConfig`` (``assistant_only_loss``:
    assistant; conversational ``messages``: all; prompt/completion: response unless ``completion_only_loss``
    is False) and is required with a plain ``Trainer``, whose collator decides. ``max_length``: None reads the
    ``SFTConfig``'s (required otherwise). ``model_name``: the base model as llmeraser should load it (default
    the adapter's ``base_model_name_or_path``). ``fit_curvature``: also save the adapter into the output
    directory and fit its EK-FAC curvature cache into the user cache (``$LLMERASER_CACHE``), so that the
    first ``erase --mode auto`` is fast.

    Weight decay: AdamW's decay is decoupled (θ ← θ − lr·wd·θ besides the Adam step), not an L2 term of the
    loss; its effect at the end of training is the per-coordinate penalty ½ Σ wd·(√v̂_j + ε)θ_j² (see
    ``effective_l2``). ``weight_decay=None`` records the single L2 coefficient λ that best matches it
    (λ = wd · Σ (√v̂_j + ε)θ_j² / Σ θ_j², from the optimiser state at the end), which is what llmeraser's
    objective R(θ) = (1/N) Σ ℓ_i + (λ/2)‖θ‖² uses; a float records that λ as given. With
    ``TrainingArguments.weight_decay == 0`` λ is 0. The record also keeps the optimiser's own setting
    (``trainer_weight_decay``), and its ``origin`` says it came from this callback: a paired retrain (which
    reruns llmeraser's own recipe) is refused for it, the influence update is not.

    The ``Trainer`` averages the loss over all loss tokens of a batch, llmeraser over each example's tokens
    then over examples: for examples of similar length the minimisers agree; the recipe's seed is
    ``TrainingArguments.seed`` (for the ``tiny`` test model it is also the seed its weights are built from).
    """

    def __init__(
        self,
        train_data: str | Path | Sequence[Example] | Iterable[Mapping[str, Any]],
        *,
        loss_scope: str | None = None,
        max_length: int | None = None,
        weight_decay: float | None = None,
        model_name: str | None = None,
        fit_curvature: bool = False,
    ) -> None:
        if isinstance(train_data, (str, Path)):
            self.examples: list[Example] = list(read_examples(train_data))
        else:
            rows: list[Any] = list(train_data)  # Examples, or rows to read as examples
            self.examples = rows if rows and all(isinstance(r, Example) for r in rows) else list(examples_from_rows(rows))
        if loss_scope is not None and loss_scope not in LOSS_SCOPES:
            raise ValueError(f"unknown loss_scope {loss_scope!r} (expected one of: {', '.join(LOSS_SCOPES)})")
        self.loss_scope, self.max_length, self.weight_decay = loss_scope, max_length, weight_decay
        self.model_name, self.fit_curvature = model_name, fit_curvature
        self.record: TrainingRecord | None = None

    def _scope_and_length(self, args: Any) -> tuple[str, int]:
        scope, length = self.loss_scope, self.max_length
        if scope is None:
            if not hasattr(args, "assistant_only_loss"):
                raise ValueError("LlmeraserCallback needs loss_scope= with a plain Trainer (its data collator decides "
                                 "which tokens carry the loss): response, assistant or all")
            conversational = any(e.is_conversation and e.prompt_turns is None for e in self.examples)
            if getattr(args, "assistant_only_loss", False):
                scope = "assistant"
            elif conversational:
                scope = "all"
            else:
                scope = "all" if getattr(args, "completion_only_loss", None) is False else "response"
        if length is None:
            length = getattr(args, "max_length", None)
            if length is None:
                raise ValueError("LlmeraserCallback needs max_length= (the max tokens per example of the run)")
        return scope, int(length)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._scope_and_length(args)  # refuse a missing setting before training, not after

    def build_record(self, args: Any, model: Any, optimizer: Any, tokenizer: Any) -> TrainingRecord:
        """The training record of the run so far (``model``: the PEFT model being trained)."""
        from llmeraser.lifecycle import chat_template_hash

        scope, length = self._scope_and_length(args)
        config = model.peft_config[getattr(model, "active_adapter", "default")]
        targets = config.target_modules
        targets = targets if isinstance(targets, str) else tuple(sorted(targets))
        lora = LoraSettings(int(config.r), float(config.lora_alpha), float(config.lora_dropout or 0.0), targets, int(args.seed))
        params = [p for p in model.parameters() if p.requires_grad]
        decay = self.weight_decay if self.weight_decay is not None else (
            effective_l2(optimizer, params, float(args.weight_decay)) if optimizer is not None and args.weight_decay
            else 0.0)
        schedule = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
        world = max(int(getattr(args, "world_size", 1)), 1)
        recipe = TrainConfig(
            epochs=int(round(float(args.num_train_epochs))), lr=float(args.learning_rate),
            batch_size=int(args.per_device_train_batch_size) * int(args.gradient_accumulation_steps) * world,
            weight_decay=float(decay), seed=int(args.seed), max_length=length, optimizer="adamw",  # type: ignore[arg-type]
            lr_schedule=str(schedule), loss_scope=scope,  # type: ignore[arg-type]
        )
        base = model.get_base_model()
        name = self.model_name or config.base_model_name_or_path or getattr(base, "name_or_path", None)
        if not name:
            raise ValueError("LlmeraserCallback needs model_name= (the base model, as llmeraser should load it)")
        parts = fingerprint_parts(base, targets)
        return TrainingRecord(str(name), combine_parts(parts), dataset_hash(self.examples), len(self.examples), recipe,
                              lora, parts, ORIGIN_CALLBACK, chat_template_hash(tokenizer) if tokenizer is not None else None)

    def _write(self, directory: str | Path, args: Any) -> None:
        assert self.record is not None
        body = {**self.record.to_json(), "trainer_weight_decay": float(args.weight_decay),
                "trainer_optimizer": str(getattr(args.optim, "value", args.optim))}
        Path(directory).mkdir(parents=True, exist_ok=True)
        write_text_atomic(Path(directory) / TRAINING_RECORD, json.dumps(body, indent=2, sort_keys=True) + "\n")

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        self.record = self.build_record(args, kwargs["model"], kwargs.get("optimizer"), _tokenizer(kwargs))
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if checkpoint.is_dir():
            self._write(checkpoint, args)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        model = kwargs["model"]
        self.record = self.build_record(args, model, kwargs.get("optimizer"), _tokenizer(kwargs))
        self._write(args.output_dir, args)
        if self.fit_curvature:
            self._fit(args, model)

    def _fit(self, args: Any, model: Any) -> None:
        """Save the adapter beside the record and fit its curvature cache where ``erase --mode auto`` looks."""
        from llmeraser.lifecycle import Adapter
        from llmeraser.plan import AUTO_CACHE_METHOD, auto_fit_config

        model.save_pretrained(args.output_dir)
        adapter = Adapter.load(args.output_dir)
        path = adapter.default_curvature_path(self.examples, AUTO_CACHE_METHOD)
        if not (path / "curvature.json").is_file():
            adapter.fit_curvature(self.examples, path, auto_fit_config())


def _tokenizer(kwargs: Mapping[str, Any]) -> Any:
    return kwargs.get("processing_class") or kwargs.get("tokenizer")
