"""`load_datasets`: a run's data read, split and tokenized into Arrow files (memory-mapped), cached on disk.

Rows are read one at a time and written to an Arrow file after their fields are checked (`normalize`), then
tokenized in batches by `datasets.map`, in `num_proc` processes. The result is kept in a cache folder named
by a fingerprint of everything it depends on: the data files (path, size, modification time and a hash of
their first and last MiB), the tokenizer (its class, its whole definition, special tokens and chat
template), and the settings (task, fields, `max_length`, the eval split, declared labels). A second run with
the same inputs reads the Arrow files and tokenizes nothing; any change makes a new folder. A folder is built
under a temporary name and renamed when complete, so one left by a killed run is never read (and a damaged
one is rebuilt).

Where: `$DELTATUNE_DATA_CACHE`, else `$XDG_CACHE_HOME/deltatune/data` (`~/.cache/deltatune/data`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from typing import Any

from deltatune.data import builtin as builtin_data
from deltatune.data.sources import Fields, _is_saved_dataset, iter_rows, shard_files, split_indices
from deltatune.data.tokenize import COLUMNS, Where, causal_format, encode_batch, label_map_of, normalize
from deltatune.errors import DataError

logger = logging.getLogger(__name__)

CACHE_VERSION = 3  # 3: empty causal-LM texts (and one-token examples) are left out
"""Bumped when what is cached changes meaning, so that old folders are never read."""


@dataclass
class Datasets:
    """Tokenized examples ready for `collate`/`Batcher`, and what was learned reading them."""

    train: Any
    """Examples `{"input_ids", "labels", "length"}`: memory-mapped `ArrowExamples`, a `TrainStream` when
    streaming, or a plain list."""
    eval: Any
    label_map: dict[str, int] | None
    """Label name -> class id (classification only)."""
    format: str
    """`classification`, `text`, `prompt-completion` or `messages`."""
    cached: bool = False
    """Whether the tokenized data came from the cache (nothing was tokenized)."""
    cache_path: str | None = None
    """The cache folder holding the Arrow files."""


class ArrowExamples:
    """Tokenized examples in an Arrow IPC *file* (random access), memory-mapped: a read pages in only the
    record batches it touches, so memory stays flat however many rows there are. `examples[i]` is one example
    as a dict, `examples[[i, j, ...]]` (and slices) the columns of those rows, as `datasets.Dataset` gives
    them; only pyarrow is needed, so a cached run doesn't import `datasets`.

    Pages of the file that reads touched stay mapped into the process and count in its RSS (clean file pages
    the kernel may drop, but counted): an epoch, or an evaluation over rows spread through the file, would
    show the whole file as this process's memory. So every `RELEASE_EVERY` rows read (and after whole-column
    reads) the mapping's pages are released (`madvise(MADV_DONTNEED)`: a later read pages them in again from
    the page cache; the data stays valid)."""

    RELEASE_EVERY = 1024

    def __init__(self, path: str, lengths: str | None = None):
        import mmap

        import numpy as np
        import pyarrow as pa

        self.path, self.lengths_path = path, lengths
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.reader = pa.ipc.open_file(pa.BufferReader(pa.py_buffer(self._map)))
        self.column_names = self.reader.schema.names
        sizes = [self.reader.get_record_batch(b).num_rows for b in range(self.reader.num_record_batches)]
        self.starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self._unreleased = 0

    def release(self) -> None:
        """Drop the pages of the file that reads mapped in from this process (no-op where unsupported)."""
        import mmap

        self._unreleased = 0
        if hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)

    def _count(self, rows: int) -> None:
        self._unreleased += rows
        if self._unreleased >= self.RELEASE_EVERY:
            self.release()

    @property
    def paths(self) -> list[str]:
        return [self.path] + ([self.lengths_path] if self.lengths_path else [])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _rows(self, ids: list[int]) -> Any:
        import numpy as np
        import pyarrow as pa

        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= len(self)):
            raise IndexError(f"row index out of range 0..{len(self) - 1}")
        where = np.searchsorted(self.starts, ids, side="right") - 1
        parts = [
            self.reader.get_record_batch(int(b)).slice(int(i - self.starts[b]), 1) for i, b in zip(ids, where)
        ]
        return pa.Table.from_batches(parts, schema=self.reader.schema)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):
            key = list(range(*key.indices(len(self))))
        if isinstance(key, (list, tuple)) or hasattr(key, "__array__"):
            columns = self._rows(list(key)).to_pydict()
            self._count(len(key))
            return columns
        row = self._rows([key + len(self) if key < 0 else key]).to_pylist()[0]
        self._count(1)
        return row

    def __iter__(self):
        for b in range(self.reader.num_record_batches):
            rows = self.reader.get_record_batch(b).to_pylist()
            self._count(len(rows))
            yield from rows

    def column(self, name: str) -> Any:
        """One column as a NumPy array (`length` comes from its own small file: no row is read)."""
        import numpy as np

        if name == "length" and self.lengths_path:
            return np.load(self.lengths_path, mmap_mode="r")
        values = np.concatenate(
            [
                self.reader.get_record_batch(b).column(name).to_numpy()
                for b in range(self.reader.num_record_batches)
            ]
        )  # (a copy: the mapping's pages can go)
        self.release()
        return values

    def __repr__(self) -> str:
        return f"ArrowExamples({len(self)} rows: {', '.join(self.column_names)})"


def _to_ipc_file(sources: list[str], path: str, lengths_path: str, rows_per_batch: int = 8192) -> None:
    """Rewrite the Arrow streams `datasets.map` wrote as one IPC file (batches of `rows_per_batch` rows, for
    random access) and every example's length as a NumPy file; reads and writes one batch at a time."""
    import numpy as np
    import pyarrow as pa

    lengths, pending, count = [], [], 0
    writer = None
    try:
        for source in sources:
            with pa.OSFile(source) as f:  # read, not mapped: pages of the whole file would count as ours
                for batch in pa.ipc.open_stream(f):
                    if writer is None:
                        writer = pa.ipc.new_file(path, batch.schema)
                    lengths.append(batch.column("length").to_numpy().astype(np.int32))
                    pending.append(batch)
                    count += batch.num_rows
                    if count >= rows_per_batch:
                        writer.write_table(
                            pa.Table.from_batches(pending).combine_chunks(), max_chunksize=rows_per_batch
                        )
                        pending, count = [], 0
        if writer is not None and pending:
            writer.write_table(pa.Table.from_batches(pending).combine_chunks(), max_chunksize=rows_per_batch)
    finally:
        if writer is not None:
            writer.close()
    np.save(lengths_path, np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int32))


def cache_root() -> str:
    """Where tokenized data is cached (see the module docs)."""
    if os.environ.get("DELTATUNE_DATA_CACHE"):
        return os.environ["DELTATUNE_DATA_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "deltatune", "data")


def source_fingerprint(source: str) -> dict[str, Any]:
    """What identifies the contents of `source` without reading all of it: for every file its path, size,
    modification time (ns) and a hash of its first and last MiB; a built-in set by the code that makes it."""
    if source.startswith("builtin:"):
        with open(builtin_data.__file__, "rb") as f:
            return {"builtin": source, "code": hashlib.sha256(f.read()).hexdigest()}
    if os.path.isdir(source) and _is_saved_dataset(source):
        files = sorted(
            os.path.join(root, f)
            for root, _, names in os.walk(source)
            for f in names
            if not f.startswith(".")
        )
    else:
        files = shard_files(source)
    out = []
    for path in files:
        stat = os.stat(path)
        h = hashlib.sha256()
        with open(path, "rb") as f:
            h.update(f.read(1 << 20))
            if stat.st_size > 2 << 20:
                f.seek(-(1 << 20), os.SEEK_END)
                h.update(f.read())
        out.append([os.path.abspath(path), stat.st_size, stat.st_mtime_ns, h.hexdigest()])
    return {"source": os.path.abspath(source), "files": out}


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything about `tokenizer` that changes its output: its class, its full definition
    (vocabulary, merges, normalizer, added tokens), special tokens and chat template."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        for state in ("truncation", "padding"):  # set by the last call, not part of what it is
            definition.pop(state, None)
        h.update(json.dumps(definition, sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extra = {
        "special": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
        "chat_template": getattr(tokenizer, "chat_template", None),
        "eos": tokenizer.eos_token_id,
        "bos": getattr(tokenizer, "bos_token_id", None),
        "truncation_side": getattr(tokenizer, "truncation_side", None),
        "model_max_length": getattr(tokenizer, "model_max_length", None),
    }
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


PROCS_PER_CORE = 4  # the most tokenizing processes per CPU core (`num_proc` beyond it is lowered to it)


def load_datasets(
    data: str,
    tokenizer: Any,
    *,
    task: str,
    eval_data: str | None = None,
    eval_fraction: float = 0.0,
    fields: Fields | None = None,
    max_length: int = 128,
    seed: int = 0,
    labels: list[str | int] | None = None,
    num_proc: int = 1,
    cache_dir: str | None = None,
) -> Datasets:
    """Read, split and tokenize the training and eval data, or read them from the cache.

    Args:
        data: a file, a folder of shards, a `save_to_disk` folder or `builtin:<name>`.
        tokenizer: a Hugging Face tokenizer.
        task: `seq-cls` or `causal-lm`.
        eval_data: a held-out file; if None and `eval_fraction` is 0, a built-in set's own eval split.
        eval_fraction: hold out this fraction of `data` instead (chosen with `seed`).
        fields: column names.
        max_length: longer examples are truncated to this many tokens.
        seed: for the held-out fraction.
        labels: classification: the label set, class `i` being the `i`-th entry (default: the labels seen).
        num_proc: processes that tokenize.
        cache_dir: the cache (default `cache_root()`).

    Raises:
        DataError: naming the file, the line (or row) and the field of the first bad row.
    """
    fields = fields or Fields()
    if eval_data is not None and eval_fraction:
        raise DataError("set either eval_data or eval_fraction, not both")
    eval_data = eval_data or (None if eval_fraction else builtin_data.default_eval(data))
    settings = {
        "version": CACHE_VERSION,
        "task": task,
        "data": source_fingerprint(data),
        "eval_data": source_fingerprint(eval_data) if eval_data else None,
        "eval_fraction": eval_fraction,
        "seed": seed if eval_fraction else None,
        "fields": dataclasses.asdict(fields),
        "max_length": max_length,
        "labels": labels,
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]
    root = cache_dir or cache_root()
    folder = os.path.join(root, key)
    cached = _load(folder, settings)
    if cached is not None:
        logger.info("tokenized data from the cache %s", folder)
        return cached
    tmp = f"{folder}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        os.makedirs(root, exist_ok=True)
        _remove_abandoned(root)
        os.makedirs(tmp)
    except OSError as e:  # a file in the way, no permission, a read-only file system
        raise DataError(
            f"the data cache {root} can't be written in ({e.strerror or e}); set DELTATUNE_DATA_CACHE to a "
            "folder you can write"
        ) from e
    try:
        meta = _build(
            tmp, data, eval_data, tokenizer, task, fields, max_length, eval_fraction, seed, labels, num_proc
        )
        meta["settings"] = settings
        with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.rename(tmp, folder)  # complete, or not there at all
        except OSError:  # another process finished the same folder first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result = _load(folder, settings)
    if result is None:
        raise DataError(f"the data cache {folder} could not be read back right after writing it")
    result.cached = False
    return result


def _build(
    tmp: str,
    data: str,
    eval_data: str | None,
    tokenizer: Any,
    task: str,
    fields: Fields,
    max_length: int,
    eval_fraction: float,
    seed: int,
    labels: list[str | int] | None,
    num_proc: int,
) -> dict[str, Any]:
    import datasets

    if num_proc > (most := PROCS_PER_CORE * (os.cpu_count() or 1)):  # `num_proc=1000`: a thousand processes
        logger.warning(
            "num_proc=%d on %d CPU cores: tokenizing in %d processes (more would only wait for each other)",
            num_proc,
            os.cpu_count() or 1,
            most,
        )
        num_proc = most
    if task == "seq-cls":
        fmt = "classification"
    else:
        first = next(iter_rows(data, fields, "train"), None)
        if first is None:
            raise DataError(f"{data}: no examples in it (is the file empty?)")
        fmt = causal_format(first, fields)
    if fmt == "messages" and not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{data}: the tokenizer has no chat template, so 'messages' can't be rendered; "
            "use a chat model's tokenizer or the text / prompt+completion fields"
        )
    train = _write_rows(os.path.join(tmp, "rows-train.arrow"), data, "train", fmt, fields)
    locate = {"train": functools.partial(_where_of, data, fields, "train")}
    if eval_data is not None:
        evals = _write_rows(os.path.join(tmp, "rows-eval.arrow"), eval_data, "eval", fmt, fields)
        locate["eval"] = functools.partial(_where_of, eval_data, fields, "eval")
    elif eval_fraction:
        kept, held = split_indices(len(train), eval_fraction, seed)
        train, evals = train.select(kept), train.select(held)
        locate["eval"] = locate["train"]  # the rows keep their numbers in the file
    else:
        evals = None
    label_map = None
    if fmt == "classification":
        label_map = label_map_of(_label_pairs(train, locate["train"]), labels)
        if evals is not None:
            for where, name in _label_pairs(evals, locate["eval"]):
                if name not in label_map:
                    raise DataError(
                        f"{where}: label {name!r} never appears in the training data "
                        f"(known labels: {', '.join(label_map)})"
                    )
    meta: dict[str, Any] = {"format": fmt, "label_map": label_map, "files": {}, "rows": {}, "dropped": {}}
    encode = {"tokenizer": tokenizer, "fmt": fmt, "max_length": max_length, "label_map": label_map}
    label_feature = (
        datasets.Value("int64") if fmt == "classification" else datasets.Sequence(datasets.Value("int32"))
    )
    features = datasets.Features(
        {
            "input_ids": datasets.Sequence(datasets.Value("int32")),
            "labels": label_feature,
            "length": datasets.Value("int32"),
        }
    )
    for split, rows in (("train", train), ("eval", evals)):
        if rows is None:
            meta["files"][split], meta["rows"][split], meta["dropped"][split] = [], 0, 0
            continue
        tokens = rows.map(
            encode_batch,
            fn_kwargs=encode | {"locate": locate[split]},
            batched=True,
            batch_size=1000,
            num_proc=num_proc if num_proc > 1 and len(rows) >= 2 * num_proc else None,
            remove_columns=rows.column_names,
            features=features,
            cache_file_name=os.path.join(tmp, f"{split}.arrow"),
            load_from_cache_file=False,
            new_fingerprint=f"{split}-{uuid.uuid4().hex}",
            desc=f"tokenizing {split}",
        )
        streams = [f["filename"] for f in tokens.cache_files]
        meta["rows"][split], meta["dropped"][split] = len(tokens), len(rows) - len(tokens)
        del tokens
        if meta["rows"][split]:
            _to_ipc_file(
                streams,
                os.path.join(tmp, f"{split}-examples.arrow"),
                os.path.join(tmp, f"{split}-lengths.npy"),
            )
            meta["files"][split] = [f"{split}-examples.arrow", f"{split}-lengths.npy"]
        else:
            meta["files"][split] = []
        for stream in streams:
            os.unlink(stream)
    if not meta["rows"]["train"]:
        raise DataError(
            f"{data}: no example is left to train on after tokenizing: {meta['dropped']['train']} were empty "
            f"or had nothing to learn within max_length={max_length} tokens"
        )
    for name in os.listdir(tmp):
        if name.startswith("rows-"):
            os.unlink(os.path.join(tmp, name))  # the untokenized rows: not needed any more
    return meta


def _write_rows(path: str, source: str, role: str, fmt: str, fields: Fields) -> Any:
    """Every row of `source`, its fields checked and normalized, written to an Arrow file; memory-mapped."""
    import datasets
    from datasets.arrow_writer import ArrowWriter

    features = datasets.Features({c: datasets.Value("string") for c in COLUMNS[fmt]})
    features["_row"] = datasets.Value("int64")  # its number in the source, to name it in a message
    with ArrowWriter(path=path, features=features, writer_batch_size=1000) as writer:
        for i, row in enumerate(iter_rows(source, fields, role)):
            record = normalize(row, fmt, fields)
            del record["_where"]
            record["_row"] = i
            writer.write(record)
        count, _ = writer.finalize()
    if not count:
        raise DataError(f"{source}: no examples in it (is the file empty?)")
    return datasets.Dataset.from_file(path)


def _label_pairs(rows: Any, locate: Any, chunk: int = 10_000):
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        yield from zip((Where(locate, i) for i in part["_row"]), part["label"])


def _where_of(source: str, fields: Fields, role: str, index: int) -> str:
    """Where the `index`-th row of `source` is (by reading up to it: only for an error message)."""
    row = next(itertools.islice(iter_rows(source, fields, role), index, None), None)
    return row[0] if row else f"{source} row {index}"


def _load(folder: str, settings: dict[str, Any]) -> Datasets | None:
    """The cached data in `folder`, or None if there is none; a damaged folder is removed (and so rebuilt)."""
    meta_path = os.path.join(folder, "meta.json")
    if not os.path.isdir(folder):
        return None
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("settings") != settings:
            raise ValueError("it was made for other data, tokenizer or settings")
        splits: dict[str, Any] = {}
        for split in ("train", "eval"):
            names = meta["files"][split]
            splits[split] = ArrowExamples(*(os.path.join(folder, n) for n in names)) if names else []
            if len(splits[split]) != meta["rows"][split]:
                raise ValueError(f"{split} has {len(splits[split])} rows, not {meta['rows'][split]}")
            if names and splits[split].column("length").shape != (meta["rows"][split],):
                raise ValueError(f"{split}'s lengths file does not have one length per row")
    except Exception as e:  # a missing meta.json, a truncated Arrow file, ...: rebuild
        logger.warning("the data cache %s is incomplete or damaged (%s); building it again", folder, e)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    for split, count in meta.get("dropped", {}).items():  # said on every run, from the cache too
        if count:
            logger.warning(
                "%d %s example(s) were empty or had nothing to learn within max_length=%d tokens; skipped",
                count,
                split,
                settings["max_length"],
            )
    return Datasets(splits["train"], splits["eval"], meta["label_map"], meta["format"], True, folder)


def _remove_abandoned(root: str) -> None:
    """Remove the temporary folders of builds whose process is gone (a run killed while tokenizing)."""
    for name in os.listdir(root):
        _, sep, rest = name.partition(".tmp-")
        if not sep:
            continue
        digits = rest.split("-")[0]  # ASCII, and short enough for os.kill (a stray name is no process)
        pid = int(digits) if digits.isascii() and digits.isdigit() and len(digits) <= 9 else -1
        try:
            os.kill(pid, 0)
            alive = pid > 0
        except PermissionError:  # someone else's process
            alive = True
        except OSError:
            alive = False
        if not alive:
            with contextlib.suppress(OSError):
                shutil.rmtree(os.path.join(root, name))
