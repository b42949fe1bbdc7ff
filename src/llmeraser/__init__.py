"""llmeraser: influence-function unlearning for LoRA / PEFT fine-tuned language models."""

__version__ = "0.1.0"
