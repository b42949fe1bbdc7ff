"""The paper's experiments, apart from the core package ``llmeraser`` (which never imports this one).

``llmeraser bench`` (``protocol`` runs methods per ratio and seed, ``baselines`` holds the compared methods,
``metrics`` scores them (``pii`` and ``nextitem``: the generative tasks' scores), ``attacks`` holds the
membership attacks and ``robustness`` the quantisation check (``quantise``) and the relearning attack,
``report`` aggregates and writes the results, ``resources`` measures time and memory); ``recsys``: rating
data and the TALLRec / next-item examples built from it (``llmeraser make-data``); ``demo``: ``llmeraser demo``.
Needs the ``bench`` extra (``pip install "llmeraser[bench]"``: matplotlib, psutil).
"""

import importlib.util as _util

_missing = [name for name in ("matplotlib", "psutil") if _util.find_spec(name) is None]
if _missing:
    raise ImportError(f"llmeraser's experiments need the 'bench' extra: pip install \"llmeraser[bench]\" "
                      f"(missing: {', '.join(_missing)})")


# after the check above, so that a missing extra is named rather than failing inside an import
from llmeraser_bench.protocol import DEFAULT_METHODS, METHODS, BenchConfig, quick_config, run_bench  # noqa: E402
from llmeraser_bench.report import finish, render_text, write_results  # noqa: E402

__all__ = ["BenchConfig", "DEFAULT_METHODS", "METHODS", "finish", "quick_config", "render_text", "run_bench", "write_results"]
