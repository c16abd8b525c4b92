"""`deltatune train`: a YAML config -> a model with one method -> one plain training loop -> an adapter.

    deltatune train --config configs/lora.yaml [key=value ...] [--resume | --overwrite]
    torchrun --nproc_per_node=2 -m deltatune train --config configs/lora.yaml

- `config.py`: `TrainConfig`, loading (YAML + `key=value` overrides) and validation, before any model loads;
- `loop.py`: `train(model, data, config)`, the loop, which gets a ready model and knows no method, and
  `evaluate`;
- `run.py`: `run(config)`, the Python entry (tokenizer, data, model, method, loop, final save);
- `cli.py`: `deltatune train`, the command line (light: its `--help` imports no torch). Training checkpoints (`checkpoints/step-N/`) are read and written by `deltatune.checkpoint`.

A run folder holds `train_config.yaml`, `label_map.json` (classification), `metrics.jsonl`,
`checkpoints/step-N/` (the last `keep_checkpoints`), `adapter/` (with the tokenizer) and `summary.json`.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from deltatune.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from deltatune.errors import TrainingError
    from deltatune.train.cli import train_main
    from deltatune.train.config import (
        DTYPES,
        TASK_TYPES,
        TrainConfig,
        config_from_dict,
        load_train_config,
        output_dir,
        validate,
    )
    from deltatune.train.loop import Context, evaluate, peak_memory_mb, seed_everything, train
    from deltatune.train.run import build_model, run

# Names are imported on first use, so that `deltatune train --help` doesn't wait for torch.
_WHERE = {
    "latest_checkpoint": "deltatune.checkpoint",
    "load_checkpoint": "deltatune.checkpoint",
    "save_checkpoint": "deltatune.checkpoint",
    "TrainingError": "deltatune.errors",
    "train_main": "deltatune.train.cli",
    "main": "deltatune.train.cli",
    **dict.fromkeys(
        (
            "DTYPES",
            "TASK_TYPES",
            "TrainConfig",
            "config_from_dict",
            "load_train_config",
            "output_dir",
            "validate",
        ),
        "deltatune.train.config",
    ),
    **dict.fromkeys(
        ("Context", "evaluate", "peak_memory_mb", "seed_everything", "train"), "deltatune.train.loop"
    ),
    "build_model": "deltatune.train.run",
    "run": "deltatune.train.run",
}

__all__ = [
    "DTYPES",
    "TASK_TYPES",
    "Context",
    "TrainConfig",
    "TrainingError",
    "build_model",
    "config_from_dict",
    "evaluate",
    "latest_checkpoint",
    "load_checkpoint",
    "load_train_config",
    "output_dir",
    "peak_memory_mb",
    "run",
    "save_checkpoint",
    "seed_everything",
    "train",
    "train_main",
    "validate",
]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'deltatune.train' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    if name != "train":  # `deltatune.train.train` is the loop function, never shadowed by a submodule
        globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Importing the submodule `deltatune.train.run` binds it as this package's `run`; keep `run` the
    function (as `from deltatune.train import run` has always given), whichever is imported first."""

    def __setattr__(self, name: str, value: object) -> None:
        if name == "run" and isinstance(value, types.ModuleType):
            value = value.run
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
