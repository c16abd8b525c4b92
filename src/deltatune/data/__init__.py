"""Training data: sources -> tokenized examples -> batches.

- `sources`: reading files (JSONL, CSV/TSV, Parquet, text, `save_to_disk` folders) and built-in sets into
  `(where, record)` rows; errors name the file and the line;
- `tokenize`: field mapping (`Fields`), label maps, prompt masking, chat templates, and `load_datasets`;
- `packing`: causal-LM examples packed into `max_length` rows;
- `batching`: collating examples into tensors, and the batches of each epoch and each rank;
- `builtin`: the built-in sets `builtin:spam` and `builtin:quotes`.
"""

from deltatune.data.batching import (
    MODES,
    Batcher,
    batches_per_epoch,
    collate,
    epoch_batches,
    eval_batches,
    grouped_order,
)
from deltatune.data.packing import block_causal_mask, collate_packed, pack, pack_bins, packed_attention
from deltatune.data.sources import (
    FORMATS,
    IGNORE_INDEX,
    Fields,
    Row,
    check_source,
    read_rows,
    split_eval,
)
from deltatune.data.tokenize import (
    Datasets,
    build_label_map,
    causal_format,
    encode_causal,
    encode_classification,
    load_datasets,
)
from deltatune.errors import DataError

__all__ = [
    "FORMATS",
    "MODES",
    "Batcher",
    "block_causal_mask",
    "collate_packed",
    "grouped_order",
    "pack_bins",
    "packed_attention",
    "IGNORE_INDEX",
    "DataError",
    "Datasets",
    "Fields",
    "Row",
    "batches_per_epoch",
    "build_label_map",
    "causal_format",
    "check_source",
    "collate",
    "encode_causal",
    "encode_classification",
    "epoch_batches",
    "eval_batches",
    "load_datasets",
    "pack",
    "read_rows",
    "split_eval",
]
