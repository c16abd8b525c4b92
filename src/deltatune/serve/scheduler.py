"""The schedulers: the one thread that runs every model call, and how it forms batches.

`ContinuousScheduler` (the default) keeps a running batch and takes one decoding step for all its rows at a
time. A new request joins at the next step: its prompt is prefilled (the `n` choices of one prompt share one
prefill; a prompt longer than `prefill_chunk` tokens is prefilled one chunk per step), its keys/values are written
into a free slot of the running batch's preallocated cache (`kvcache.RowCache`: joining and leaving copy only the
rows concerned, and a step writes one column in place), and from then on it decodes with the others. While rows
are running, new prompts and the next chunk of a long one ride along in their decoding step: one model call reads
the weights once for both (`packed.py`; where the model's attention can't be folded, or `fold_prefill` is off,
prompts arriving together are prefilled together in a call of their own, before the step). A row leaves the step
it finishes (its length, EOS, a stop string or a disconnect seen by the event loop). Each row keeps its own adapter
through the mixed-adapter path (`adapter_names=`: one gathered matmul per layer over the rows, never a loop over
adapters); DoRA adapters, which can't share a mixed batch, run in a lane of their own. Positions are per row, so a
greedy row gets what `generate` gives for its adapter alone. Adapter files are read in the engine's reader thread;
this thread only attaches them. When more adapters are wanted than `max_loaded_adapters` fit, a row waiting for one
doesn't wait for a loaded adapter's rows to run dry: once an adapter has had its slot `adapter_slice` steps, it is
paused for the waiting row (its rows keep their caches, queue again and resume where they were, bit for bit).

`StaticScheduler` (`--scheduler static`) takes what arrived within `batch_wait_ms` and runs it as one
`generate`; every row waits for the longest.

Failures are per row: a row whose logits are not finite, whose sampling throws, or whose adapter fails to load
gets its own error; when a batched model call throws, the rows are retried one by one so only those that fail
alone fail, and the others carry on with the answer they would have had alone.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

from deltatune.methods.mixed import BASE
from deltatune.serve import packed
from deltatune.serve.errors import ApiError, overloaded, shutting_down
from deltatune.serve.kvcache import RowCache
from deltatune.serve.sampling import RowSampler, pick_rows

logger = logging.getLogger("deltatune.serve")


@dataclass(eq=False)
class Row:
    """One row: a prompt to continue (`generate`) or a text to classify (`classify`).

    The model thread reports through `sink(event)`: ("token", id), ("done", finish_reason), ("result", value)
    or ("error", ApiError). The event loop sets `cancelled` (a disconnect, a stop string) and the row leaves at
    the next step.
    """

    kind: str
    adapter: str
    ids: list[int]
    max_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    token_type_ids: list[int] | None = None
    # (frequency_penalty, presence_penalty, logit_bias {token id: bias}), when the request sets any
    adjust: tuple[float, float, dict[int, float]] | None = None
    sink: Callable[[tuple], None] | None = None
    cancelled: bool = False
    arrived: float = field(default_factory=time.monotonic)
    produced: int = 0
    last_time: float = 0.0
    sampler: RowSampler | None = None
    finished: bool = False
    # A row paused to free its adapter's slot for a row that waited (continuous scheduler): its keys/values
    # (per layer, `[1, heads, p, head_dim]`), their mask `[1, p]` and its next input token, until it resumes.
    paused: tuple | None = None

    def emit(self, event: tuple) -> None:
        if self.sink is None:
            return
        try:
            self.sink(event)
        except Exception:  # the client is gone (its event loop closed): stop working for it
            self.cancelled = True

    def fail(self, error: ApiError) -> None:
        if not self.finished:
            self.finished = True
            self.emit(("error", error))

    def finish(self, reason: str) -> None:
        if not self.finished:
            self.finished = True
            self.emit(("done", reason))


@dataclass
class _Command:
    fn: Callable[[], Any]
    future: Future


def _row_error(row: Row, e: BaseException) -> ApiError:
    """The error a row gets when a model call fails for it alone."""
    if isinstance(e, ApiError):
        return e
    logger.error("a row for %r failed", row.adapter, exc_info=e)
    which = "the base model" if row.adapter == BASE else f"the adapter {row.adapter!r}"
    return ApiError(
        422, f"this request failed in {which}: {type(e).__name__}: {e}", "request_failed", "model"
    )


class _Scheduler:
    """The queue, the model thread, commands run between steps, and shutdown."""

    name = "?"
    background_loads = False  # read adapter files in the engine's reader thread (rows wait, the batch runs)

    def __init__(self, engine, *, max_batch: int, batch_wait_ms: float, max_queue: int):
        self.engine = engine
        self.max_batch, self.batch_wait, self.max_queue = max_batch, batch_wait_ms / 1000, max_queue
        self.metrics = engine.metrics
        self._queue: queue.Queue = queue.Queue()
        self.pending: deque[Row] = deque()
        self.closing = False
        self._stopped = False
        self.stats: dict[str, int] = {
            "rows": 0,
            "model_calls": 0,
            "prefills": 0,
            "decode_steps": 0,
            "max_rows_per_call": 0,
            "max_adapters_per_call": 0,
            "failed_rows": 0,
            "cancelled_rows": 0,
            "joined_running": 0,
        }
        self._thread = threading.Thread(target=self._run, name=f"deltatune-serve-{self.name}", daemon=True)
        self._thread.start()

    # ---- event loop side -----------------------------------------------------------------------------
    def submit(self, rows: list[Row]) -> None:
        if self.closing or self._stopped:  # (stopped: the model thread ended, on an error of its own)
            raise shutting_down()
        if self.queued() + len(rows) > self.max_queue:
            raise overloaded()
        for row in rows:
            self._queue.put(row)
        if (
            self._stopped
        ):  # it ended meanwhile, perhaps after its last look at the queue: nothing would take them
            self._drain()

    def command(self, fn: Callable[[], Any]) -> Future:
        future: Future = Future()
        if self._stopped:
            future.set_exception(shutting_down())
        else:
            self._queue.put(_Command(fn, future))
        return future

    def queued(self) -> int:
        return self._queue.qsize() + len(self.pending)

    def close(self, timeout: float = 60) -> None:
        """Stop taking requests, fail what is still queued or running (503), stop the thread."""
        self.closing = True
        self._queue.put(None)
        self._thread.join(timeout=timeout)

    def stats_dict(self) -> dict[str, int]:
        return dict(self.stats)

    # ---- model thread --------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:
            logger.exception("the model thread stopped")
        finally:
            self._stopped = True
            for row in self._all_rows():
                row.fail(shutting_down())
            self._drain()

    def _drain(self) -> None:
        """Fail what is in the queue (the model thread has ended)."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Row):
                item.fail(shutting_down())
            elif isinstance(item, _Command):
                item.future.set_exception(shutting_down())

    def _all_rows(self) -> list[Row]:
        return list(self.pending)

    def _take(self, block: bool, timeout: float | None = None) -> None:
        """Move what arrived into `pending`, running commands as they come; sets `_stopped` on None."""
        try:
            item = self._queue.get(timeout=timeout) if block else self._queue.get_nowait()
        except queue.Empty:
            return
        while True:
            if item is None:
                self._stopped = True
            elif isinstance(item, _Command):
                self._run_command(item)
            else:
                self.pending.append(item)
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
        self.metrics.queue_depth.set(self.queued())

    def _run_command(self, command: _Command) -> None:
        if not command.future.set_running_or_notify_cancel():
            return
        try:
            command.future.set_result(command.fn())
        except BaseException as e:
            command.future.set_exception(e)
        self._after_command()

    def _after_command(self) -> None:
        """Hook: rows whose adapter was just unloaded."""

    def fail_queued(self, adapter: str) -> None:
        """Fail the queued rows of an adapter that was just unloaded (model thread), paused ones too: none of them
        may run on an adapter registered again under the same name before the next step (a paused row would go on
        from its cached keys and values with the new weights)."""
        keep: deque[Row] = deque()
        for row in self.pending:
            if row.adapter == adapter:
                row.fail(ApiError(404, f"the adapter {adapter!r} was unloaded", "model_not_found", "model"))
            else:
                keep.append(row)
        self.pending = keep

    def pinned(self) -> set[str]:
        """Adapters that must stay in memory now (model thread): none between two static batches."""
        return set()

    def _admit(
        self,
        limit: int,
        pinned: set[str],
        max_loads: int = 1 << 30,
        held: frozenset[str] = frozenset(),
        budget: _Budget | None = None,
    ) -> list[Row]:
        """Up to `limit` pending rows whose adapter is (now) in memory, in arrival order, loading at most
        `max_loads` adapters; rows whose adapter can't be loaded fail, rows whose adapter doesn't fit yet wait, and
        so do rows of the adapters `held` (being freed for a row that waits). With a `budget`, the prompt tokens
        the rows taken will prefill stay within it (the first prompt of a step is taken whatever its length);
        once a prompt doesn't fit, no later one is taken this step (arrival order is kept)."""
        take: list[Row] = []
        keep: deque[Row] = deque()
        loads = 0
        while self.pending:
            row = self.pending.popleft()
            if row.cancelled:
                row.finished = True
                continue
            if len(take) >= limit or row.adapter in held:
                keep.append(row)
                continue
            cost = budget.cost(row) if budget is not None else 0
            if cost and not budget.fits(cost):
                keep.append(row)
                continue
            was_loaded = row.adapter == BASE or self.engine.registry.is_loaded(row.adapter)
            try:
                ok = self.engine.ensure_loaded(
                    row.adapter, pinned, may_load=loads < max_loads, background=self.background_loads
                )
            except Exception as e:
                row.fail(_row_error(row, e))
                continue
            if not ok:
                keep.append(row)
                continue
            loads += not was_loaded
            pinned.add(row.adapter)
            if row.sampler is None:  # (a paused row keeps its own, its generator where it was)
                row.sampler = RowSampler(
                    row.adapter, row.temperature, row.top_p, row.seed, self.engine.device, *(row.adjust or ())
                )
            take.append(row)
            if cost:
                budget.spend(row, cost)
        self.pending = keep
        return take

    def _note_call(self, rows: list[Row]) -> None:
        self.stats["model_calls"] += 1
        self.stats["max_rows_per_call"] = max(self.stats["max_rows_per_call"], len(rows))
        adapters = len({row.adapter for row in rows})
        self.stats["max_adapters_per_call"] = max(self.stats["max_adapters_per_call"], adapters)

    def _emit_token(self, row: Row, token: int) -> bool:
        """Send a token; True when the row is done after it."""
        now = time.monotonic()
        if row.produced == 0:
            self.metrics.ttft.observe(now - row.arrived)
        else:
            self.metrics.itl.observe(now - row.last_time)
        row.produced += 1
        row.last_time = now
        row.emit(("token", token))
        if token in self.engine.eos_ids:
            row.finish("stop")
            return True
        if row.produced >= row.max_tokens:
            row.finish("length")
            return True
        if row.cancelled:
            row.finished = True
            self.stats["cancelled_rows"] += 1
            return True
        return False


# ---- continuous batching -------------------------------------------------------------------------------------
@dataclass(eq=False)
class _Lane:
    """A running batch: its rows, their KV cache (a RowCache: one slot per row, in the rows' order) and last
    tokens. `solo` names the one adapter of a lane that can't be mixed (DoRA); None for the mixed lane."""

    solo: str | None
    rows: list[Row] = field(default_factory=list)
    cache: RowCache = field(default_factory=RowCache)
    last: list[int] = field(default_factory=list)


@dataclass(eq=False)
class _Chunked:
    """A prompt longer than the prefill chunk, prefilled one chunk per step between the running rows' decoding
    steps: the rows that share it (`n` choices), its own cache so far, how many of its tokens are in it."""

    solo: str | None
    adapter: str
    ids: list[int]
    rows: list[Row]
    cache: Any = None
    done: int = 0


class _Budget:
    """The prompt tokens one scheduling step may still prefill (`max_prefill_tokens`): a burst of new requests is
    admitted over several steps instead of stalling the running rows for one long prefill. A prompt counts once
    however many rows share it (`n` > 1), a long one (chunked) for its first chunk, a paused row's not at all."""

    def __init__(self, tokens: int, chunk: int):
        self.left, self.chunk = tokens, chunk
        self.started = self.closed = False
        self.seen: set[tuple[str, tuple[int, ...]]] = set()

    def cost(self, row: Row) -> int:
        if row.paused is not None or (row.adapter, tuple(row.ids)) in self.seen:
            return 0
        return min(len(row.ids), self.chunk)

    def fits(self, cost: int) -> bool:
        if not self.closed and (not self.started or cost <= self.left):
            return True
        self.closed = True
        return False

    def spend(self, row: Row, cost: int) -> None:
        self.seen.add((row.adapter, tuple(row.ids)))
        self.left -= cost
        self.started = True


class ContinuousScheduler(_Scheduler):
    name = "continuous"
    background_loads = True

    def __init__(
        self,
        engine,
        *,
        prefill_chunk: int = 256,
        adapter_slice: int = 16,
        max_prefill_tokens: int = 0,
        fold_prefill: bool = True,
        **kwargs,
    ):
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1, got {prefill_chunk}")
        if max_prefill_tokens < 0:
            raise ValueError(f"max_prefill_tokens must be 0 (no limit) or more, got {max_prefill_tokens}")
        if adapter_slice < 0:
            raise ValueError(f"adapter_slice must be 0 (off) or more steps, got {adapter_slice}")
        self.lanes: dict[str | None, _Lane] = {}
        self.chunked: deque[_Chunked] = deque()
        self.prefill_chunk = prefill_chunk
        self.adapter_slice = adapter_slice
        self.max_prefill_tokens = max_prefill_tokens
        self.fold_prefill = fold_prefill
        self._waiting = False  # every pending row waits for its adapter's files (the reader wakes us)
        self._steps = 0  # scheduling steps taken
        self._since: dict[str, int] = {}  # the step since which each adapter of the running rows has had rows
        # Rows taken this step to ride along in their lane's decoding step (per lane): in no queue and no lane until
        # that step, so `_all_rows` must see them here (if the thread stops before it, they are failed, not lost).
        self._folding: dict[str | None, list[Row]] = {}
        super().__init__(engine, **kwargs)
        self.stats.update(
            prefill_chunks=0, adapter_pauses=0, paused_rows=0, resumed_rows=0, folded_prefills=0
        )

    def _all_rows(self) -> list[Row]:
        return [
            *self.pending,
            *(r for job in self.chunked for r in job.rows),
            *(r for lane in self.lanes.values() for r in lane.rows),
            *(r for rows in self._folding.values() for r in rows),
        ]

    def running(self) -> int:
        """Rows decoding, and rows whose long prompt is being prefilled."""
        return sum(len(lane.rows) for lane in self.lanes.values()) + sum(len(j.rows) for j in self.chunked)

    def _loop(self) -> None:
        while not self._stopped:
            idle = not self.running() and (not self.pending or self._waiting)
            self._take(block=idle)
            if self._stopped:
                return
            self._reap()
            # A row that waits for an adapter slot while every slot is in use gets one: the adapter in use the
            # longest (at least `adapter_slice` steps) is paused, its rows keep their caches and queue again.
            held = self._pause_for_waiters()
            # Rows whose adapter is in memory join first; then at most one adapter is attached per step (its
            # files were read in the reader thread meanwhile), so a load holds neither them nor, for long, the
            # running rows.
            admitted, busy = False, bool(self.running())
            # New prompts ride along in their lane's decoding step when it has running rows (packed.py)
            fold = self._foldable()
            self._folding = folding = {}
            budget = _Budget(self.max_prefill_tokens, self.prefill_chunk) if self.max_prefill_tokens else None
            for max_loads in (0, 1):
                # (rows taken to ride along in this step are not in their lane yet: they count, and their adapters
                # stay in memory through the second pass's load)
                free = self.max_batch - self.running() - sum(map(len, folding.values()))
                if free <= 0 or not self.pending:
                    break
                by_lane: dict[str | None, list[Row]] = {}
                pinned = self.pinned() | {row.adapter for rows in folding.values() for row in rows}
                for row in self._admit(free, pinned, max_loads, held, budget):
                    solo = row.adapter if self.engine.is_solo(row.adapter) else None
                    by_lane.setdefault(solo, []).append(row)
                    admitted = True
                for solo, rows in by_lane.items():
                    fresh = [row for row in rows if row.paused is None]
                    self._resume(solo, [row for row in rows if row.paused is not None])
                    rows = fresh
                    short = [row for row in rows if len(row.ids) <= self.prefill_chunk]
                    if short and solo in fold:
                        folding.setdefault(solo, []).extend(short)
                    elif short:
                        self._prefill(solo, short)
                    self._queue_chunked(solo, [row for row in rows if len(row.ids) > self.prefill_chunk])
            # Block for the reader only when nothing ran: rows that held adapters may leave at this step's decode,
            # and then the next step must look again (nothing else would wake it).
            self._waiting = bool(self.pending) and not admitted and not held and not busy
            self.engine.prune_reads({row.adapter for row in self.pending})
            self._steps += 1
            active = {row.adapter for lane in self.lanes.values() for row in lane.rows} - {BASE}
            self._since = {a: self._since.get(a, self._steps) for a in active}
            # one chunk of a long prompt per step, in its lane's step (folded) or between the steps
            chunk_lane = self.chunked[0].solo if self.chunked else _NO_LANE
            if chunk_lane is not _NO_LANE and chunk_lane not in fold:
                self._prefill_chunk()
                chunk_lane = _NO_LANE
            for solo, lane in list(self.lanes.items()):
                if solo in folding or solo == chunk_lane:
                    self._decode_folded(lane, folding.get(solo, []), solo == chunk_lane)
                elif lane.rows:
                    self._decode(lane)
            self._folding = {}
            self.metrics.running.set(self.running())
            self.metrics.queue_depth.set(self.queued())

    def _after_command(self) -> None:
        self._reap()

    def pinned(self) -> set[str]:
        """Adapters that can't be evicted now: those of the running rows and of the long prompts being prefilled."""
        return {row.adapter for lane in self.lanes.values() for row in lane.rows} | {
            job.adapter for job in self.chunked
        }

    def _pause_for_waiters(self) -> frozenset[str]:
        """When a row waits for an adapter whose files are read, no slot is free (every loaded adapter has running
        rows) and an adapter has had rows for `adapter_slice` steps or more, pause the one that has had them the
        longest: its rows leave the batch with their caches and queue again behind the rows waiting, and the
        adapter is held (no row joins it) so that this step's load evicts it. Returns the held adapters.

        Without this a waiting row would wait for every row of some adapter to finish — for as long as rows for it
        keep arriving. The pause is bounded: each adapter keeps its slot at least `adapter_slice` steps, and the
        paused rows (whose caches stay in memory) are at most `max_batch`. An adapter whose rows all end within half
        a slice (by their `max_tokens`) is left to finish: its slot frees soon anyway, and pausing rows a few tokens
        from their end only adds a wait to their latency and a reload to the model thread."""
        if not self.adapter_slice or not self.pending:
            return frozenset()
        registry = self.engine.registry
        pinned = self.pinned()
        if registry.victims(pinned) is not None:  # a slot is free, or held by an adapter no row uses
            return frozenset()
        if sum(row.paused is not None for row in self.pending) >= self.max_batch:
            return frozenset()
        if not any(not row.cancelled and self.engine.read_ready(row.adapter) for row in self.pending):
            return frozenset()
        chunking = {job.adapter for job in self.chunked}
        due = [
            a
            for a, since in self._since.items()
            if self._steps - since >= self.adapter_slice and a not in chunking and registry.is_loaded(a)
        ]
        if not due:
            return frozenset()
        left: dict[str, int] = {}  # the most tokens any row of an adapter may still produce
        for lane in self.lanes.values():
            for row in lane.rows:
                left[row.adapter] = max(left.get(row.adapter, 0), row.max_tokens - row.produced)
        due = [a for a in due if left.get(a, 0) > self.adapter_slice // 2]
        if not due:
            return frozenset()
        victim = min(due, key=self._since.__getitem__)
        for lane in self.lanes.values():
            which = [i for i, row in enumerate(lane.rows) if row.adapter == victim]
            if not which:
                continue
            pairs, mask = lane.cache.take(which)
            for j, i in enumerate(which):
                row = lane.rows[i]
                row.paused = ([(k[j : j + 1], v[j : j + 1]) for k, v in pairs], mask[j : j + 1], lane.last[i])
                self.pending.append(row)
            self.stats["paused_rows"] += len(which)
            self._select(lane, [i for i in range(len(lane.rows)) if i not in set(which)])
        self.stats["adapter_pauses"] += 1
        self.metrics.adapter_events.labels(event="pause").inc()
        del self._since[victim]
        return frozenset({victim})

    def _resume(self, solo: str | None, rows: list[Row]) -> None:
        """Paused rows whose adapter is back: their caches rejoin the lane, and they decode on where they were."""
        if not rows:
            return
        lane = self.lanes.setdefault(solo, _Lane(solo))
        for row in rows:
            pairs, mask, last = row.paused
            row.paused = None
            lane.cache.join(pairs, mask)
            lane.rows.append(row)
            lane.last.append(last)
        self.stats["resumed_rows"] += len(rows)

    def _queue_chunked(self, solo: str | None, rows: list[Row]) -> None:
        jobs: dict[tuple[str, tuple[int, ...]], _Chunked] = {}
        for row in rows:
            key = (row.adapter, tuple(row.ids))
            if key not in jobs:
                jobs[key] = _Chunked(solo, row.adapter, list(row.ids), [])
                self.chunked.append(jobs[key])
            jobs[key].rows.append(row)

    def _reap(self) -> None:
        """Drop rows that were cancelled or whose adapter is gone."""
        for job in list(self.chunked):
            if job.adapter != BASE and not self.engine.registry.is_loaded(job.adapter):
                for row in job.rows:
                    row.fail(
                        ApiError(404, f"the adapter {row.adapter!r} was unloaded", "model_not_found", "model")
                    )
                job.rows = []
            for row in job.rows:
                if row.cancelled:
                    row.finished = True
                    self.stats["cancelled_rows"] += 1
            job.rows = [row for row in job.rows if not row.finished]
            if not job.rows:
                self.chunked.remove(job)
        for lane in self.lanes.values():
            keep = []
            for i, row in enumerate(lane.rows):
                if row.adapter != BASE and not self.engine.registry.is_loaded(row.adapter):
                    row.fail(
                        ApiError(404, f"the adapter {row.adapter!r} was unloaded", "model_not_found", "model")
                    )
                elif row.cancelled:
                    row.finished = True
                    self.stats["cancelled_rows"] += 1
                else:
                    keep.append(i)
            if len(keep) < len(lane.rows):
                self._select(lane, keep)

    # ---- model calls -----------------------------------------------------------------------------------
    def _forward(self, solo, adapters, ids, mask, positions, cache):
        engine = self.engine
        module, extra = engine.module_for(adapters, solo)
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "use_cache": True}
        if cache is not None:
            kwargs[engine.cache_kwarg] = cache
        if engine.takes_positions:
            kwargs["position_ids"] = positions
        if engine.takes_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        with torch.inference_mode():
            out = module(
                **{k: v.to(engine.device) if torch.is_tensor(v) else v for k, v in kwargs.items()}, **extra
            )
        new_cache = getattr(out, "cache", None)
        if new_cache is None:
            new_cache = out.past_key_values
        return out.logits[:, -1].float(), new_cache

    def _prefill(self, solo: str | None, rows: list[Row]) -> None:
        """Prefill the new rows' prompts (each distinct prompt once), pick their first tokens, and merge the
        rows that go on into their lane."""
        unique: dict[tuple[str, tuple[int, ...]], int] = {}
        which = [unique.setdefault((row.adapter, tuple(row.ids)), len(unique)) for row in rows]
        prompts = list(unique)
        width = max(len(p) for _, p in prompts)
        ids = torch.full((len(prompts), width), self.engine.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, (_, p) in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        try:
            logits, cache = self._forward(solo, [a for a, _ in prompts], ids, mask, positions, None)
        except Exception as e:
            if len(prompts) == 1:
                for row in rows:
                    row.fail(_row_error(row, e))
                self.stats["failed_rows"] += len(rows)
                return
            for u in range(len(prompts)):  # find the prompt(s) that fail alone; the others go on
                self._prefill(solo, [row for row, w in zip(rows, which) if w == u])
            return
        self._note_call(rows)
        self._start(solo, rows, which, logits, _pairs(cache), mask)

    def _start(self, solo: str | None, rows: list[Row], which: list[int], logits, pairs, mask) -> None:
        """After a prefill: pick the rows' first tokens (row i from `logits[which[i]]`) and move the rows that go
        on, with their rows of the prefill's keys/values (`pairs`, per layer) and `mask`, into their lane."""
        self.stats["prefills"] += 1
        lane = self.lanes.get(solo)
        if lane is not None and lane.rows:
            self.stats["joined_running"] += len(rows)
        self.metrics.steps.labels(kind="prefill").inc()
        going: list[int] = []
        firsts: list[int] = []
        picks = pick_rows([row.sampler for row in rows], logits[torch.tensor(which, device=logits.device)])
        for i, (row, token) in enumerate(zip(rows, picks)):
            self.stats["rows"] += 1
            if isinstance(token, BaseException):
                row.fail(_row_error(row, token))
                self.stats["failed_rows"] += 1
                continue
            if not self._emit_token(row, token):
                going.append(i)
                firsts.append(token)
        if not going:
            return
        index = torch.tensor([which[i] for i in going], device=logits.device)
        pairs = [(k.index_select(0, index), v.index_select(0, index)) for k, v in pairs]
        lane = self.lanes.setdefault(solo, _Lane(solo))
        lane.cache.join(pairs, mask.index_select(0, index.cpu()))
        lane.rows += [rows[i] for i in going]
        lane.last += firsts

    def _prefill_chunk(self) -> None:
        """Take the next chunk of the oldest long prompt (its rows' own cache grows by one chunk); after its last
        chunk the rows get their first token and join their lane."""
        job = self.chunked[0]
        start, end = job.done, min(len(job.ids), job.done + self.prefill_chunk)
        ids = torch.tensor([job.ids[start:end]], dtype=torch.long)
        mask = torch.ones((1, end), dtype=torch.long)
        positions = torch.arange(start, end, dtype=torch.long).view(1, -1)
        try:
            past = job.cache
            if isinstance(past, list):  # an earlier chunk went in a folded step
                past = DynamicCache(ddp_cache_data=past)
            logits, cache = self._forward(job.solo, [job.adapter], ids, mask, positions, past)
        except Exception as e:
            self.chunked.popleft()
            for row in job.rows:
                row.fail(_row_error(row, e))
            self.stats["failed_rows"] += len(job.rows)
            return
        job.cache, job.done = cache, end
        self.stats["prefill_chunks"] += 1
        self._note_call(job.rows)
        if end == len(job.ids):
            self.chunked.popleft()
            self._start(job.solo, job.rows, [0] * len(job.rows), logits, _pairs(cache), mask)

    def _foldable(self) -> set[str | None]:
        """The lanes whose decoding step this step's new prompts can ride along in: those with running rows, when
        the model's attention can be folded (packed.py)."""
        if not self.fold_prefill or not packed.supports(self.engine.base):
            return set()
        return {solo for solo, lane in self.lanes.items() if lane.rows}

    def _decode_folded(self, lane: _Lane, fresh: list[Row], chunk: bool) -> None:
        """A lane's decoding step with the `fresh` rows' prompts (each distinct one once) and, with `chunk`, the
        next chunk of the oldest long prompt (of this lane), in one model call. The fresh rows then join the lane
        with their first token, as after a prefill of their own. If the call throws, each part runs on its own, as
        without folding (and the failures are found row by row there); if none fails there, folding is what
        failed, and it is turned off for this server."""
        job = self.chunked[0] if chunk else None
        if not self.fold_prefill:  # turned off earlier in this step (another lane's folded call failed)
            self._unfolded(lane, fresh, job)
            return
        engine = self.engine
        unique: dict[tuple[str, tuple[int, ...]], int] = {}
        which = [unique.setdefault((row.adapter, tuple(row.ids)), len(unique)) for row in fresh]
        segments = [packed.Segment(adapter, list(ids)) for adapter, ids in unique]
        if job is not None:
            end = min(len(job.ids), job.done + self.prefill_chunk)
            past = _pairs(job.cache) if job.cache is not None else None
            segments.append(packed.Segment(job.adapter, job.ids[job.done : end], job.done, past))
        rows = lane.rows
        lane.cache.step_inputs()
        names = packed.adapter_names([row.adapter for row in rows], segments)
        module, extra = engine.module_for(names, lane.solo)
        try:
            logits = packed.run(
                module, engine.base, extra, lane.cache, lane.last, segments, engine.device, engine.cache_kwarg
            )
        except Exception as e:
            lane.cache.undo_step()
            failed = self.stats["failed_rows"]
            self._unfolded(lane, fresh, job)
            if self.stats["failed_rows"] == failed:  # every part ran on its own: folding itself failed
                self.fold_prefill = False  # (else each step would try, fail and run twice)
                logger.warning(
                    "a folded prefill failed (%s: %s) where its parts ran on their own; prompts are prefilled on "
                    "their own from now on",
                    type(e).__name__,
                    e,
                )
            else:
                logger.debug("a folded step failed (%s); its parts ran on their own", e)
            return
        self._note_call([*rows, *fresh, *(job.rows if job is not None else [])])
        self.stats["folded_prefills"] += len(segments)
        self._decoded(lane, logits)
        for u, seg in enumerate(segments[: len(unique)]):
            mine = [row for row, w in zip(fresh, which) if w == u]
            mask = torch.ones((1, len(seg.ids)), dtype=torch.long)
            self._start(lane.solo, mine, [0] * len(mine), seg.logits, seg.pairs, mask)
        if job is not None:
            seg = segments[-1]
            job.cache, job.done = seg.pairs, seg.start + len(seg.ids)
            self.stats["prefill_chunks"] += 1
            if job.done == len(job.ids):
                self.chunked.popleft()
                mask = torch.ones((1, job.done), dtype=torch.long)
                self._start(job.solo, job.rows, [0] * len(job.rows), seg.logits, seg.pairs, mask)

    def _unfolded(self, lane: _Lane, fresh: list[Row], job: _Chunked | None) -> None:
        """What `_decode_folded` does in one call, in a call each: the fresh rows' prefill, the long prompt's
        chunk, the lane's decoding step."""
        if fresh:
            self._prefill(lane.solo, fresh)
        if job is not None:
            self._prefill_chunk()
        if lane.rows:
            self._decode(lane)

    def _select(self, lane: _Lane, keep: list[int]) -> None:
        """Keep only rows `keep` of a lane (the cache moves the last rows into the holes: the order changes)."""
        order = lane.cache.select(keep)
        lane.rows = [lane.rows[i] for i in order]
        lane.last = [lane.last[i] for i in order]

    def _decode(self, lane: _Lane) -> None:
        rows = lane.rows
        ids = torch.tensor(lane.last, dtype=torch.long).view(-1, 1)
        mask, positions = lane.cache.step_inputs()
        try:
            logits, _ = self._forward(
                lane.solo, [row.adapter for row in rows], ids, mask, positions, lane.cache
            )
        except Exception:
            mask, positions = mask.clone(), positions.clone()
            lane.cache.undo_step()
            self._isolate(lane, ids, mask, positions)
            return
        self._note_call(rows)
        self._decoded(lane, logits)

    def _decoded(self, lane: _Lane, logits) -> None:
        """After a decoding step went through: advance the cache, pick each row's token, let finished rows go."""
        rows = lane.rows
        lane.cache.advance()
        self.stats["decode_steps"] += 1
        self.metrics.steps.labels(kind="decode").inc()
        keep = []
        for i, (row, token) in enumerate(zip(rows, pick_rows([row.sampler for row in rows], logits))):
            if isinstance(token, BaseException):
                row.fail(_row_error(row, token))
                self.stats["failed_rows"] += 1
                continue
            if not self._emit_token(row, token):
                lane.last[i] = token
                keep.append(i)
        if len(keep) < len(rows):
            self._select(lane, keep)

    def _isolate(self, lane: _Lane, ids, mask, positions) -> None:
        """A batched step threw: run each row alone on its own slice of the cache; those that throw alone fail,
        the others stay (their step is retried together next time)."""
        bad = []
        for i, row in enumerate(lane.rows):
            one = lane.cache.row(i)
            try:
                self._forward(
                    lane.solo, [row.adapter], ids[i : i + 1], mask[i : i + 1], positions[i : i + 1], one
                )
            except Exception as e:
                bad.append(i)
                row.fail(_row_error(row, e))
        self.stats["failed_rows"] += len(bad)
        if not bad:  # fails together, never alone: give up on this batch rather than loop
            logger.error(
                "a decoding step of %d rows failed, and no row alone; failing them all", len(lane.rows)
            )
            for row in lane.rows:
                row.fail(
                    ApiError(
                        503,
                        "the batch this request ran in failed; retry",
                        "batch_failed",
                        type_="server_error",
                    )
                )
            self._select(lane, [])
            return
        self._select(lane, [i for i in range(len(lane.rows)) if i not in bad])


_NO_LANE = object()  # no long prompt's chunk this step


def _pairs(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer `(keys, values)` of a model call's cache (or such a list already)."""
    if isinstance(cache, list):
        return cache
    return [(layer.keys, layer.values) for layer in cache.layers]


# ---- static batching -----------------------------------------------------------------------------------------
class _StaticSampler(LogitsProcessor):
    """Each row's own pick inside one greedy `generate`: only the chosen token stays finite. A row whose pick
    throws is recorded and padded out; the others go on untouched."""

    def __init__(self, rows: list[Row], pad_id: int):
        self.rows, self.pad_id = rows, pad_id
        self.errors: dict[int, BaseException] = {}

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        out = torch.full_like(scores, float("-inf"))
        for i, row in enumerate(self.rows):
            token = self.pad_id
            if i not in self.errors:
                try:
                    token = row.sampler.pick(scores[i].float())
                except Exception as e:
                    self.errors[i] = e
                    token = self.pad_id
            out[i, token] = 0.0
        return out


class StaticScheduler(_Scheduler):
    name = "static"

    def _loop(self) -> None:
        while not self._stopped:
            if not self.pending:
                self._take(block=True)
            if self._stopped:
                return
            deadline = time.monotonic() + self.batch_wait
            while len(self.pending) < self.max_batch and not self._stopped:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._take(block=True, timeout=left)
            self._take(block=False)
            if self._stopped:
                return
            rows = self._admit(self.max_batch, set())
            groups: dict[tuple[str, str | None], list[Row]] = {}
            for row in rows:
                key = (row.kind, row.adapter if self.engine.is_solo(row.adapter) else None)
                groups.setdefault(key, []).append(row)
            for group in groups.values():
                for part in self._fit_context(group):
                    self._run_rows(part)
            self.metrics.queue_depth.set(self.queued())

    def _fit_context(self, rows: list[Row]) -> list[list[Row]]:
        """Split rows so no call runs past the context: left padding makes every row as long as the longest
        prompt, and every row runs for the most tokens any row asks for."""
        limit = self.engine.context_length or float("inf")
        parts: list[list[Row]] = []
        width = new = 0
        for row in rows:
            w, n = max(width, len(row.ids)), max(new, row.max_tokens)
            if not parts or w + n > limit:
                parts.append([])
                w, n = len(row.ids), row.max_tokens
            parts[-1].append(row)
            width, new = w, n
        return parts

    def _run_rows(self, rows: list[Row]) -> None:
        live = [row for row in rows if not row.cancelled]
        if not live:
            return
        try:
            if live[0].kind == "generate":
                self._generate(live)
            else:
                for row, result in zip(live, self.engine.classify(live)):
                    row.fail(result) if isinstance(result, ApiError) else (
                        row.emit(("result", result)),
                        row.finish("stop"),
                    )
        except Exception as e:
            if len(live) == 1:
                live[0].fail(_row_error(live[0], e))
                self.stats["failed_rows"] += 1
                return
            for row in live:  # find the rows that fail alone; the others get their answer
                self._run_rows([row])
            return
        self.stats["rows"] += len(live)
        self._note_call(live)
        self.metrics.steps.labels(kind="generate").inc()

    def _generate(self, rows: list[Row]) -> None:
        engine = self.engine
        width = max(len(row.ids) for row in rows)
        ids = torch.full((len(rows), width), engine.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row.ids) :] = torch.tensor(row.ids)
            mask[i, width - len(row.ids) :] = 1
        solo = rows[0].adapter if engine.is_solo(rows[0].adapter) else None
        module, extra = engine.module_for([row.adapter for row in rows], solo)
        sampler = _StaticSampler(rows, engine.pad_id)
        with torch.inference_mode():
            out = module.generate(
                input_ids=ids.to(engine.device),
                attention_mask=mask.to(engine.device),
                max_new_tokens=max(row.max_tokens for row in rows),
                do_sample=False,
                num_beams=1,
                pad_token_id=engine.pad_id,
                logits_processor=LogitsProcessorList([sampler]),
                **extra,
            )
        for i, row in enumerate(rows):
            if i in sampler.errors:
                row.fail(_row_error(row, sampler.errors[i]))
                self.stats["failed_rows"] += 1
                continue
            for token in out[i, width : width + row.max_tokens].tolist():
                if self._emit_token(row, token):
                    break
