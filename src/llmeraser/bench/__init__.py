"""``llmeraser bench``: the paper's experiments on TALLRec rating data, against retraining and baselines.

``protocol`` runs methods per ratio and seed, ``baselines`` holds the compared methods, ``metrics`` scores
them (``pii`` and ``nextitem``: the generative tasks' scores), ``attacks`` holds the membership attacks and
``robustness`` the quantisation check (``quantise``) and the relearning attack, ``report`` aggregates and
writes the results, ``resources`` measures time and memory.
"""

from llmeraser.bench.protocol import DEFAULT_METHODS, METHODS, BenchConfig, quick_config, run_bench
from llmeraser.bench.report import finish, render_text, write_results

__all__ = ["BenchConfig", "DEFAULT_METHODS", "METHODS", "finish", "quick_config", "render_text", "run_bench", "write_results"]
