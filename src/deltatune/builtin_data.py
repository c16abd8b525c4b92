"""Old home of the built-in data sets; they live in `deltatune.data.builtin` now."""

from deltatune.data.builtin import BUILTIN, default_eval, load_builtin, quotes, spam

__all__ = ["BUILTIN", "default_eval", "load_builtin", "quotes", "spam"]
