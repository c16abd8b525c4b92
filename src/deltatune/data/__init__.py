"""Training data: sources -> tokenized examples -> batches.

- `sources`: reading files (JSONL, CSV/TSV, Parquet, text, `save_to_disk` folders) and built-in sets into
  `(where, record)` rows; errors name the file and the line;
- `tokenize`: field mapping (`Fields`), label maps, prompt masking, chat templates;
- `cache`: `load_datasets`: rows -> Arrow (memory-mapped), tokenized in `num_proc` processes, cached on disk;
- `packing`: causal-LM examples packed into `max_length` rows;
- `batching`: collating examples into tensors, and the batches of each epoch and each rank (padded,
  grouped by length, packed or padding-free);
- `streaming`: training data read, tokenized and batched as it is used, with exact resume;
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
    take,
)
from deltatune.data.cache import (
    Datasets,
    cache_root,
    load_datasets,
    source_fingerprint,
    tokenizer_fingerprint,
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
from deltatune.data.streaming import StreamBatcher, TrainStream, load_stream, make_batcher, open_stream
from deltatune.data.tokenize import (
    build_label_map,
    causal_format,
    encode_causal,
    encode_classification,
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
    "StreamBatcher",
    "TrainStream",
    "load_stream",
    "make_batcher",
    "open_stream",
    "cache_root",
    "source_fingerprint",
    "tokenizer_fingerprint",
    "take",
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
