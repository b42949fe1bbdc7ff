"""Recommendation data for the LLMEraser experiments: rating loaders, TALLRec examples, corruption tasks."""

from llmeraser_bench.recsys.corruption import (
    Corruption,
    label_noise_task,
    make_task,
    query_noise_task,
    removal_task,
    write_task,
)
from llmeraser_bench.recsys.ratings import (
    Interaction,
    RatingData,
    RatingScale,
    default_ml100k_path,
    detect_format,
    load_ratings,
)
from llmeraser_bench.recsys.tallrec import (
    NO,
    YES,
    TallRecConfig,
    TallRecRecord,
    TallRecSplits,
    build_records,
    build_tallrec,
    movielens_demo_examples,
    render_prompt,
)

__all__ = [
    "NO",
    "YES",
    "Corruption",
    "Interaction",
    "RatingData",
    "RatingScale",
    "TallRecConfig",
    "TallRecRecord",
    "TallRecSplits",
    "build_records",
    "build_tallrec",
    "default_ml100k_path",
    "detect_format",
    "label_noise_task",
    "load_ratings",
    "make_task",
    "movielens_demo_examples",
    "query_noise_task",
    "removal_task",
    "render_prompt",
    "write_task",
]
