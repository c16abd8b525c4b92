"""`deltatune train`: a YAML config -> a model with one method -> one plain training loop -> an adapter.

    deltatune train --config configs/lora.yaml [key=value ...] [--resume | --overwrite]
    torchrun --nproc_per_node=2 -m deltatune train --config configs/lora.yaml

- `config.py`: `TrainConfig`, loading (YAML + `key=value` overrides) and validation, before any model loads;
- `loop.py`: `train(model, data, config)`, the loop, which gets a ready model and knows no method, and
  `evaluate`;
- `run.py`: `run(config)`, the Python entry (tokenizer, data, model, method, loop, final save), and the
  command line. Training checkpoints (`checkpoints/step-N/`) are read and written by `deltatune.checkpoint`.

A run folder holds `train_config.yaml`, `label_map.json` (classification), `metrics.jsonl`,
`checkpoints/step-N/` (the last `keep_checkpoints`), `adapter/` (with the tokenizer) and `summary.json`.
"""

from deltatune.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from deltatune.errors import TrainingError
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
from deltatune.train.run import build_model, run, train_main

main = train_main

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
