"""The on-disk formats' one owner: adapter files in PEFT's format and a run's training checkpoints, written
atomically, read without unpickling.

A directory holds `adapter_config.json` and `adapter_model.safetensors` whose keys are
`base_model.model.<module path>.<tensor>` with the adapter name removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import tempfile
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from deltatune.errors import CheckpointError, TrainingError, short

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."


def umask() -> int:
    """The process's umask (read without changing it where /proc allows, so threads don't race)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates the file 0600 (and some writers recreate it so); the file is the user's, with the
        # mode open() would have given it.
        os.chmod(tmp, 0o666 & ~umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """Write `text` to `path` through a temp file in the same folder, then rename over it."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    _atomic_write(path, write)


def atomic_save_tensors(
    path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Save tensors as safetensors at `path`, atomically (a crash leaves the old file intact)."""
    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic_write(path, lambda tmp: save_file(clean, tmp, metadata=metadata or {"format": "pt"}))


def atomic_torch_save(path: str, obj: object) -> None:
    """`torch.save` through a temp file and rename (for optimizer state in training checkpoints)."""
    _atomic_write(path, lambda tmp: torch.save(obj, tmp))


def write_adapter_config(directory: str, config_dict: dict) -> None:
    """Write `adapter_config.json` (the one place it is written), atomically."""
    os.makedirs(directory, exist_ok=True)
    atomic_write_text(os.path.join(directory, CONFIG_NAME), json.dumps(config_dict, indent=2, sort_keys=True))


def unwritable(folder: str) -> str | None:
    """Why files can't be written into `folder` (checked before any work: a file there, a read-only or missing
    place), or None. Makes the folder when it can be written in; otherwise leaves nothing it made."""
    if not str(folder).strip():
        return "names no folder (it is empty)"
    if os.path.exists(folder) and not os.path.isdir(folder):
        return "is a file, not a folder"
    made = first_missing(folder)
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as e:
        remove_made(folder, made)
        return e.strerror or type(e).__name__
    return None


def first_missing(path: str) -> str | None:
    """The outermost folder of `path` that doesn't exist yet (what making `path` creates), or None when `path`
    exists. With `remove_made`, a command that fails takes away the folders it made and nothing else."""
    path, top = os.path.abspath(path), None
    while not os.path.lexists(path):
        top, parent = path, os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return top


def remove_made(path: str, top: str | None) -> None:
    """Remove `path` and its parents up to `top` (from `first_missing`, taken before they were made), each only
    while it is empty: a folder that holds anything, and everything above it, stays."""
    if top is None:
        return
    path = os.path.abspath(path)
    while path == top or path.startswith(top.rstrip(os.sep) + os.sep):  # never above `top`
        try:
            os.rmdir(path)
        except OSError:
            return
        path = os.path.dirname(path)


def run_adapter(folder: str) -> str | None:
    """`<folder>/adapter` when `folder` is a `deltatune train` run folder holding its finished adapter (the
    folder has no adapter of its own, its `adapter/` has one), else None. The tools and `serve --adapters` take
    a run folder for its adapter."""
    if os.path.isfile(os.path.join(folder, CONFIG_NAME)):
        return None
    inner = os.path.join(folder, "adapter")
    return inner if os.path.isfile(os.path.join(inner, CONFIG_NAME)) else None


class FolderLock:
    """An exclusive advisory lock (`flock`) on a folder, held while a run writes into it, so that a second run
    can't `--overwrite`, `--resume` or write into it meanwhile. The lock lives on the folder itself (no lock
    file to clean up) and the OS drops it when the process ends, so a run that crashed or was killed leaves no
    stale lock. Where locks aren't available (no `fcntl`, a file system without them) it does nothing.

    A process forked while the lock is held (the tokenizing workers of `num_proc`) closes its copy of the
    descriptor at once: a `flock` lasts while any copy is open, and those workers outlive a run killed with
    SIGKILL, which then left its folder 'in use' until they were found and killed."""

    _held: weakref.WeakSet[FolderLock] = weakref.WeakSet()

    def __init__(self) -> None:
        self.fd: int | None = None

    @classmethod
    def _forget_in_child(cls) -> None:
        for lock in list(cls._held):
            if lock.fd is not None:
                with contextlib.suppress(OSError):
                    os.close(lock.fd)  # the child's copy only: the parent keeps the lock
                lock.fd = None
        cls._held.clear()

    def acquire(self, folder: str) -> bool:
        """Take the lock on an existing folder (True), or find it held by another process (False)."""
        try:
            import fcntl
        except ImportError:  # not a POSIX system
            return True
        try:
            fd = os.open(folder, os.O_RDONLY)
        except OSError:
            return True  # can't be opened: the write check that follows says why
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError:  # locks not supported there
            os.close(fd)
            return True
        self.release()
        self.fd = fd
        self._held.add(self)
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the lock
            self.fd = None
        type(self)._held.discard(self)

    def __del__(self) -> None:
        try:  # noqa: SIM105 (not contextlib.suppress: module globals may be None by then)
            self.release()
        except Exception:  # at interpreter exit, when `os` may be gone: the OS drops the lock anyway
            pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=FolderLock._forget_in_child)


def save_adapter(directory: str, tensors: dict[str, torch.Tensor], config_dict: dict) -> None:
    """Write one adapter directory: weights first, then the config, each atomically."""
    os.makedirs(directory, exist_ok=True)
    atomic_save_tensors(os.path.join(directory, WEIGHTS_NAME), tensors)
    write_adapter_config(directory, config_dict)


def load_tensors(path: str) -> dict[str, torch.Tensor]:
    """Read a safetensors file, or a `.bin` with `torch.load(weights_only=True)` (never a full unpickle)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} does not exist")
    if path.endswith(".safetensors"):
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(
                f"{path} is corrupt or truncated ({e}); save the adapter again or restore the file"
            ) from e
    try:
        with warnings.catch_warnings():  # torch's note on the pickle protocol is noise beside our message
            warnings.simplefilter("ignore")
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses arbitrary objects with an UnpicklingError, among others
        # torch's message runs over many lines and advises weights_only=False (running the file's code):
        # only its reason is kept ("Unsupported operand 149", "Unsupported global: GLOBAL posix.system").
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        reason = next((ln for ln in lines if ln.startswith("Unsupported")), lines[0] if lines else "")
        raise CheckpointError(
            f"{path} is not a plain tensor file ({type(e).__name__}: {reason[:200]}); deltatune reads "
            f"a .bin adapter only as plain tensors and never runs code in it: save the adapter as "
            f"{WEIGHTS_NAME} (safetensors) from a copy you trust"
        ) from e
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path} does not hold a dict of tensors")
    return data


def tensor_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """The name -> shape of every tensor in a weights file, from the safetensors header alone (nothing is
    allocated); a `.bin` file is read with `torch.load(weights_only=True)`."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} does not exist")
    if not path.endswith(".safetensors"):
        return {k: tuple(v.shape) for k, v in load_tensors(path).items()}
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{path} is corrupt or truncated ({short(str(e), 300)}); save the adapter again or restore the file"
        ) from e


def adapter_weights_file(directory: str) -> str:
    """The weights file of an adapter directory (safetensors preferred, else PEFT's legacy `.bin`)."""
    for name in (WEIGHTS_NAME, LEGACY_WEIGHTS_NAME):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise CheckpointError(f"no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}) in {short(os.fspath(directory))}")


def load_adapter_weights(directory: str) -> dict[str, torch.Tensor]:
    """The tensors of an adapter directory (safetensors preferred, `.bin` read safely)."""
    return load_tensors(adapter_weights_file(directory))


def head_num_labels(tensors: dict[str, Any]) -> int | None:
    """How many labels an adapter's classification head (`classifier`/`score`, saved with it) has, if any.

    `tensors` maps keys to tensors or to shapes (`tensor_shapes`)."""
    for head in ("classifier.weight", "score.weight", "classifier.out_proj.weight"):
        # PEFT saves a head under `base_model.model.` (or `base_model.` for prompt learning).
        tensor = tensors.get(KEY_PREFIX + head, tensors.get("base_model." + head))
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else tensor
        if shape is not None and len(shape) == 2:
            return int(shape[0])
    return None


def check_shapes(expected: dict[str, torch.Size], found: dict[str, torch.Tensor], where: str) -> None:
    """Raise one error naming every missing, unexpected and mismatched key (nothing is loaded before)."""
    problems = []
    for key, tensor in found.items():
        if key not in expected:
            problems.append(f"  {key}: in the file, but the model has no such parameter")
        elif tuple(expected[key]) != tuple(tensor.shape):
            problems.append(f"  {key}: expected shape {tuple(expected[key])}, found {tuple(tensor.shape)}")
    for key in expected:
        if key not in found:
            problems.append(f"  {key}: missing from the file")
    if problems:
        raise CheckpointError(
            f"the adapter in {where} does not fit this model ({len(problems)} problem(s)); was it trained on "
            "another architecture or size?\n"
            + "\n".join(problems[:50])
            + ("\n  ..." if len(problems) > 50 else "")
        )


# ---- training checkpoints (a run's `checkpoints/step-N/`) -----------------------------------------------------------------------------------------
def trainable_state(model: nn.Module, ctx: Any) -> dict[str, torch.Tensor]:
    """The trainable parameters by name, gathered in full (on rank 0 under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    names = {n.removeprefix("module.") for n, p in model.named_parameters() if p.requires_grad}
    options = StateDictOptions(full_state_dict=True, cpu_offload=ctx.world > 1)
    return {k: v for k, v in get_model_state_dict(model, options=options).items() if k in names}


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(rng: dict[str, Any]) -> None:
    random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
    kind, keys, *rest = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def save_checkpoint(
    out: str,
    model: nn.Module,
    optimizer: Any,
    scheduler: Any,
    scaler: Any,
    state: dict,
    ctx: Any,
    keep: int,
) -> str:
    """Write `<out>/checkpoints/step-N/` atomically: files into a temp folder, renamed into place last."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    weights = trainable_state(model, ctx)
    options = StateDictOptions(full_state_dict=True, cpu_offload=ctx.world > 1)
    optim = get_optimizer_state_dict(model, optimizer, options=options)
    rngs = [None] * ctx.world
    if ctx.world > 1:
        torch.distributed.all_gather_object(rngs, _rng_state())
    else:
        rngs = [_rng_state()]
    root = os.path.join(out, "checkpoints")
    final = os.path.join(root, f"step-{state['step']}")
    if ctx.main:
        tmp = os.path.join(root, f".step-{state['step']}.tmp")
        try:
            if os.path.isdir(root):  # what a killed save (SIGKILL, power loss) left behind
                for name in os.listdir(root):
                    if re.fullmatch(r"\.step-\d+\.tmp", name):
                        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            os.makedirs(tmp)
            atomic_save_tensors(os.path.join(tmp, "trainable.safetensors"), weights)
            training = {
                "optimizer": optim,
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": rngs,
            }
            atomic_torch_save(os.path.join(tmp, "training_state.pt"), training)
            atomic_write_text(os.path.join(tmp, "state.json"), json.dumps(state, indent=2))
            if os.path.exists(final):  # the same step saved again (a resumed run interrupted at once)
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written checkpoint behind
            if not isinstance(e, Exception):
                raise
            raise CheckpointError(
                f"could not save the checkpoint {final}: {write_failure(e, root)}. Nothing half-written was "
                f"kept; {intact_note(out)}"
            ) from e
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        for old in _checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    ctx.barrier()
    return final


def intact_note(out: str) -> str:
    """Which checkpoint of the run in `out` is intact, and how to continue from it (for error messages)."""
    last = latest_checkpoint(out)
    if last is None:
        return "no earlier checkpoint exists: the run must start again"
    return (
        f"the newest intact checkpoint is {last}: fix the cause and continue from it with "
        f"`deltatune train --config {os.path.join(out, 'train_config.yaml')} --resume`"
    )


def write_failure(error: BaseException, where: str) -> str:
    """Why writing under `where` failed, in words: a full disk, a file-size limit, or the error itself.

    torch's zip writer reports a short write as `unexpected pos ...` rather than the OS error, so the disk
    and the file-size limit are looked at when the error doesn't say.
    """
    import errno
    import resource

    code = getattr(error, "errno", None)
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return "no space left on the device"
    if code == errno.EFBIG:
        return "a file reached the file-size limit (ulimit -f)"
    with_cause = f"{type(error).__name__}: {short(str(error).splitlines()[0] if str(error) else '', 200)}"
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
        if soft != resource.RLIM_INFINITY:
            return f"{with_cause} (the file-size limit, ulimit -f, is {soft} bytes: probably reached)"
    except (ValueError, OSError):
        pass
    try:
        free = shutil.disk_usage(where).free
        if free < 64 * 2**20:
            return f"{with_cause} (only {free / 2**20:.1f} MiB free on the device: probably full)"
    except OSError:
        pass
    return with_cause


def _checkpoints(out: str) -> list[str]:
    root = os.path.join(out, "checkpoints")
    if not os.path.isdir(root):
        return []
    steps = [(int(m.group(1)), m.group(0)) for d in os.listdir(root) if (m := re.fullmatch(r"step-(\d+)", d))]
    return [
        os.path.join(root, d) for _, d in sorted(steps) if os.path.isfile(os.path.join(root, d, "state.json"))
    ]


def latest_checkpoint(out: str) -> str | None:
    """The newest complete checkpoint folder of a run, or None."""
    found = _checkpoints(out)
    return found[-1] if found else None


def _check_shapes(directory: str, weights: dict[str, torch.Tensor], model: nn.Module) -> None:
    """A checkpoint's tensors have the shapes of the model's trainable parameters; for LoRA the message names
    both ranks (the usual cause: `method_args.r` changed between the run and its --resume)."""
    for name, param in model.named_parameters():
        key = name.removeprefix("module.")
        saved = weights.get(key)
        if saved is None or tuple(saved.shape) == tuple(param.shape):
            continue
        if saved.dim() == param.dim() == 2 and (".lora_A." in key or ".lora_B." in key):
            axis = 0 if ".lora_A." in key else 1
            raise TrainingError(
                f"{directory} was saved with LoRA rank {saved.shape[axis]} ({key}), but this run's config has "
                f"rank {param.shape[axis]}: resume with the rank the run was started with (method_args.r, "
                "rank_pattern), or start a new run in another output_dir"
            )
        raise TrainingError(
            f"{directory}: {key} has the shape {list(saved.shape)} there, {list(param.shape)} in this run's "
            "model: resume with the settings the run was started with (method, method_args), or start a new "
            "run in another output_dir"
        )


def _damaged(directory: str, what: str) -> CheckpointError:
    return CheckpointError(
        f"the checkpoint {directory} is damaged ({what}): move that folder out of checkpoints/ to resume from "
        "the one before it, or start again with --overwrite"
    )


def _read_state(directory: str) -> dict:
    """A checkpoint's `state.json`: a JSON object with the step it was written at."""
    path = os.path.join(directory, "state.json")
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise _damaged(directory, f"state.json can't be read: {short(str(e), 200)}") from e
    if not isinstance(saved, dict) or not isinstance(saved.get("step"), int):
        raise _damaged(directory, "state.json is not a JSON object with the step it was written at")
    return saved


def _read_training_state(directory: str) -> dict:
    """A checkpoint's `training_state.pt` (optimizer, scheduler, scaler, RNG), read as plain data only."""
    path = os.path.join(directory, "training_state.pt")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            training = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip, a foreign pickle refused by weights_only, a missing file
        # torch's message runs over lines and advises weights_only=False: only its reason is kept
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        reason = next((ln for ln in lines if ln.startswith("Unsupported")), lines[0] if lines else "")
        reason = reason.split(". ")[0] if reason.startswith("Pytorch") else reason
        raise _damaged(
            directory, f"training_state.pt can't be read: {type(e).__name__}: {reason[:200]}"
        ) from e
    if not isinstance(training, dict) or not {"optimizer", "scheduler", "scaler", "rng"} <= set(training):
        raise _damaged(directory, "training_state.pt lacks the optimizer, scheduler, scaler or RNG state")
    return training


def load_checkpoint(
    directory: str, model: nn.Module, optimizer: Any, scheduler: Any, scaler: Any, ctx: Any, state: dict
) -> dict:
    """Restore weights, optimizer, scheduler, scaler and RNG from a checkpoint; return its training state."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    saved = _read_state(directory)
    changed = [k for k in ("world", "batch_size", "grad_accum") if saved.get(k) != state[k]]
    if changed:
        raise TrainingError(
            f"{directory} was written with "
            + ", ".join(f"{k}={saved.get(k)}" for k in changed)
            + f"; this run has {', '.join(f'{k}={state[k]}' for k in changed)}. Resume with the same settings "
            "(the data position depends on them)"
        )
    weights = load_tensors(os.path.join(directory, "trainable.safetensors"))
    names = {n.removeprefix("module.") for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != names:
        raise TrainingError(
            f"{directory} holds other trainable parameters than this model has "
            f"({len(set(weights) - names)} unexpected, {len(names - set(weights))} missing): "
            "was it saved with another method or model?"
        )
    _check_shapes(directory, weights, model)
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, weights, options=options)
    training = _read_training_state(directory)
    set_optimizer_state_dict(model, optimizer, training["optimizer"], options=options)
    scheduler.load_state_dict(training["scheduler"])
    scaler.load_state_dict(training["scaler"])
    _set_rng_state(training["rng"][ctx.rank])
    return saved
