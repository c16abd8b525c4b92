"""`deltatune inspect | merge | generate`: look at an adapter, bake it into its base, try it.

Light at import (torch and transformers are imported inside the functions), so `--help` is instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from typing import TYPE_CHECKING, Any

from deltatune import dtypes
from deltatune.cli import HelpFormatter
from deltatune.embedded import check_model, resolve_model
from deltatune.errors import CheckpointError, ConfigError, short
from deltatune.vocab import context_length

if TYPE_CHECKING:
    import torch

    from deltatune.model import PeftModel

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "label_map.json",
)


def __getattr__(name: str) -> Any:
    if name == "DTYPES":  # the old name -> torch.dtype table, built on first use (it imports torch)
        return {n: dtypes.torch_dtype(n) for n in dtypes.NAMES}
    raise AttributeError(f"module 'deltatune.tools' has no attribute {name!r}")


def load_base(
    path: str,
    task_type: str | None,
    num_labels: int | None = None,
    dtype: torch.dtype | None = None,
    meta: bool = False,
    label_map: dict[str, int] | None = None,
) -> torch.nn.Module:
    """The base model for an adapter's task type (weights on the meta device when `meta`: shapes only).

    `label_map` (`{name: id}`, a classification adapter's `label_map.json`) names the head's labels in the
    model's config (`id2label`/`label2id`), so a merged model and `transformers.pipeline` answer with names.

    Raises:
        ConfigError: `path` is a file, or neither a local model folder nor a hub name that can be fetched
            (offline, this is said in a few seconds, not after a minute of retries).
    """
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    dtype = dtype or torch.float32
    problem = check_model(path)
    if problem:
        raise ConfigError(f"base model: {problem}")
    auto = {"SEQ_CLS": AutoModelForSequenceClassification, "CAUSAL_LM": AutoModelForCausalLM}.get(
        task_type or ""
    )
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"could not load the base model {short(path)}: {str(e).splitlines()[0]}; give a Hugging Face "
            "model folder (with config.json) or a hub name"
        ) from e
    if auto is None:
        auto = (
            AutoModelForCausalLM
            if any(a.endswith("ForCausalLM") for a in config.architectures or [])
            else AutoModel
        )
    kwargs: dict[str, Any] = {}
    if auto is AutoModelForSequenceClassification:
        if label_map and (num_labels is None or num_labels == len(label_map)):
            kwargs["id2label"] = {int(i): str(n) for n, i in label_map.items()}
            kwargs["label2id"] = {str(n): int(i) for n, i in label_map.items()}
            kwargs["num_labels"] = len(label_map)
        elif num_labels:
            kwargs["num_labels"] = num_labels
    if meta:
        for key, value in kwargs.items():
            setattr(config, key, value)
        with torch.device("meta"):
            return auto.from_config(config, dtype=dtype)
    return auto.from_pretrained(path, dtype=dtype, **kwargs).eval()


def adapter_dir(path: str) -> str:
    """The adapter folder `path` names: itself, or a `deltatune train` run folder's `adapter/` (as `serve
    --adapters` takes it); a clear error otherwise."""
    from deltatune.checkpoint import run_adapter
    from deltatune.config import CONFIG_NAME

    if os.path.isfile(os.path.join(path, CONFIG_NAME)):
        return path
    if inner := run_adapter(path):
        return inner
    if os.path.isfile(os.path.join(path, "train_config.yaml")):
        raise CheckpointError(
            f"{short(path)} is a training run folder with no adapter yet (the run did not finish); resume "
            "it with `deltatune train --config " + os.path.join(path, "train_config.yaml") + " --resume`"
        )
    if not os.path.exists(path):
        raise CheckpointError(f"adapter folder not found: {short(path)}")
    raise CheckpointError(f"no {CONFIG_NAME} in {short(path)}: is this an adapter folder?")


def read_label_map(directory: str) -> dict[str, int] | None:
    """A classification adapter's `label_map.json` (`{name: id}`), or None; a bad file is an error."""
    path = os.path.join(directory, "label_map.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid UTF-8 JSON ({e})") from e
    except RecursionError as e:
        raise CheckpointError(f"{path} nests too deeply to be a label map") from e
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in data.items()
    ):
        raise CheckpointError(f"{path} must map label names to integer ids, got {short(data)}")
    return data


def _adapter_summary(directory: str) -> dict:
    from deltatune import checkpoint
    from deltatune.config import load_config

    directory = adapter_dir(directory)
    config = load_config(directory)
    weights_file = next(
        (
            os.path.join(directory, n)
            for n in (checkpoint.WEIGHTS_NAME, checkpoint.LEGACY_WEIGHTS_NAME)
            if os.path.isfile(os.path.join(directory, n))
        ),
        None,
    )
    if weights_file is None:
        raise CheckpointError(
            f"no {checkpoint.WEIGHTS_NAME} in {short(directory)}: the adapter is incomplete"
        )
    from deltatune.methods import registry

    shapes = checkpoint.tensor_shapes(weights_file)
    # What the method itself saved (a trained head, saved beside any method, is not an adapted module).
    prefix = registry.method_type(config.peft_type).key_prefix
    own = {
        k.removeprefix(prefix): s
        for k, s in shapes.items()
        if not any(k.removeprefix(prefix).startswith(f"{h}.") for h in (config.modules_to_save or []))
    }
    summary = registry.module_for(config.peft_type).summarize(own)
    label_map = read_label_map(directory)
    return {
        "directory": os.path.abspath(directory),
        "method": config.peft_type,
        "task_type": config.task_type,
        "base_model": config.base_model_name_or_path,
        "config": {
            f.name: getattr(config, f.name)
            for f in dataclasses.fields(config)
            if getattr(config, f.name) not in (None, {}, [], False) and f.name != "inference_mode"
        },
        "adapted_modules": summary.pop("adapted_modules"),
        "ranks": summary.pop("ranks", []),
        **summary,
        "tensors": len(shapes),
        "parameters": sum(_numel(s) for s in shapes.values()),
        "file_bytes": os.path.getsize(weights_file),
        "num_labels": checkpoint.head_num_labels(shapes),
        "labels": [n for n, _ in sorted(label_map.items(), key=lambda kv: kv[1])] if label_map else None,
    }


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def inspect_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="deltatune inspect",
        description="Show an adapter (method, base, ranks, modules, size, labels); with --base, check that it "
        "fits a base model (shapes only: no model is loaded), and that its weights are finite.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("adapter", help="adapter folder (for a training run: <output_dir>/adapter)")
    parser.add_argument(
        "--base", default=None, help="base model folder or hub name to check compatibility against"
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON instead of text")
    args = parser.parse_args(argv)
    from deltatune import checkpoint
    from deltatune.errors import NonFiniteWeightsError
    from deltatune.model import PeftModel, check_finite

    info = _adapter_summary(args.adapter)
    weights_file = checkpoint.adapter_weights_file(adapter_dir(args.adapter))
    try:
        check_finite(checkpoint.load_tensors(weights_file), weights_file)
        info["weights_problem"] = ""
    except NonFiniteWeightsError as e:
        info["weights_problem"] = str(e)
    if args.base:
        base = load_base(resolve_model(args.base), info["task_type"], info["num_labels"], meta=True)
        try:
            PeftModel.from_pretrained(base, adapter_dir(args.adapter))
            info["compatible"], info["problems"] = True, ""
        except NonFiniteWeightsError:  # the shapes fit; the weights are reported on their own line
            info["compatible"], info["problems"] = True, ""
        except CheckpointError as e:
            info["compatible"], info["problems"] = False, str(e)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"adapter      {info['directory']}")
        print(f"method       {info['method']}  task {info['task_type']}")
        print(f"trained on   {info['base_model']}")
        print(f"rank(s)      {info['ranks']}")
        if info["labels"] is not None:
            print(
                f"labels       {len(info['labels'])}: {', '.join(info['labels'][:20])}"
                f"{' ...' if len(info['labels']) > 20 else ''}"
            )
        elif info["num_labels"]:
            print(f"labels       {info['num_labels']} (no label_map.json: ids only)")
        print(
            f"modules      {len(info['adapted_modules'])}: {', '.join(info['adapted_modules'][:6])}"
            f"{' ...' if len(info['adapted_modules']) > 6 else ''}"
        )
        print(
            f"parameters   {info['parameters']:,d} in {info['tensors']} tensors, "
            f"file {info['file_bytes'] / 1024:.1f} KiB"
        )
        print("config       " + json.dumps(info["config"], sort_keys=True))
        print(
            f"weights      {'BROKEN: ' + info['weights_problem'] if info['weights_problem'] else 'all finite'}"
        )
        if args.base:
            verdict = "fits" if info["compatible"] else "does NOT fit"
            print(f"base         {args.base}: {verdict}")
            if info["problems"]:
                print(info["problems"])
    return 0 if info.get("compatible", True) and not info["weights_problem"] else 1


def _load(base_path: str | None, adapter: str, dtype: torch.dtype) -> tuple[PeftModel, str, dict]:
    from deltatune.model import PeftModel

    adapter = adapter_dir(adapter)
    info = _adapter_summary(adapter)
    if not (base_path or info["base_model"]):
        raise ConfigError(f"the adapter {short(adapter)} names no base model; give one with --base")
    base_path = resolve_model(base_path or info["base_model"])
    label_map = read_label_map(adapter)
    base = load_base(base_path, info["task_type"], info["num_labels"], dtype=dtype, label_map=label_map)
    return PeftModel.from_pretrained(base, adapter), base_path, info


def merge_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="deltatune merge",
        description="Merge an adapter into its base model and write a plain model folder (loads with "
        "transformers alone; a classifier keeps its label names).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--base", default=None, help="base model folder or hub name (default: the one the adapter names)"
    )
    parser.add_argument("--adapter", required=True, help="adapter folder")
    parser.add_argument("--out", required=True, help="output folder for the merged model (must not exist)")
    parser.add_argument(
        "--dtype", type=dtypes.argument, default="fp32", help=f"dtype of the merged model: {dtypes.HELP}"
    )
    args = parser.parse_args(argv)
    if not args.out.strip():  # '' is the working folder's parent's temp folder renamed to nothing
        raise ConfigError(
            f"--out {short(args.out)} names no folder; give the folder to write the merged model in"
        )
    if os.path.exists(args.out):
        raise ConfigError(f"{short(args.out)} exists already; pick a new folder for --out")
    dtype = dtypes.torch_dtype(args.dtype)
    from safetensors import SafetensorError

    from deltatune.checkpoint import first_missing, remove_made, unwritable, write_failure
    from deltatune.checkpoint import umask as checkpoint_umask

    parent = os.path.dirname(os.path.abspath(args.out))
    made = first_missing(parent)  # the folders made for --out, taken away again if the merge fails
    # Made if missing; a place that can't be written fails before the models load.
    if why := unwritable(parent):
        raise ConfigError(f"can't write into {short(parent)} ({why}); pick another --out")
    try:
        model, base_path, _ = _load(args.base, args.adapter, dtype)
        try:
            merged = model.merge_and_unload(dtype=dtype)
        except ValueError as e:  # e.g. bottleneck adapters, which have a non-linearity and can't merge
            raise ConfigError(f"can't merge {short(args.adapter)}: {e}") from e
    except BaseException:
        remove_made(parent, made)
        raise
    tmp = tempfile.mkdtemp(prefix=".merge-", dir=parent)
    try:
        os.chmod(
            tmp, 0o777 & ~checkpoint_umask()
        )  # mkdtemp makes it 0700; the folder is the user's, as mkdir makes it
        merged.save_pretrained(tmp, safe_serialization=True)
        for folder in (base_path, adapter_dir(args.adapter)):
            for name in _TOKENIZER_FILES:
                if os.path.isfile(os.path.join(folder, name)):
                    shutil.copyfile(os.path.join(folder, name), os.path.join(tmp, name))
        mask = checkpoint_umask()
        for name in os.listdir(tmp):  # safetensors writes its files 0600 whatever the umask
            os.chmod(os.path.join(tmp, name), 0o666 & ~mask)
        os.rename(tmp, args.out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_made(parent, made)
        if isinstance(e, (OSError, SafetensorError)):  # a full disk, `ulimit -f`: safetensors says neither
            raise CheckpointError(
                f"could not write the merged model to {short(args.out)}: {write_failure(e, parent)}; nothing "
                "was kept"
            ) from e
        raise
    print(f"merged {args.adapter} into {base_path} -> {args.out} ({type(merged).__name__}, {args.dtype})")
    return 0


def generate_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="deltatune generate",
        description="Generate text with a base model and an adapter; with a classification adapter, classify "
        "each prompt instead (label and probability).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--base", default=None, help="base model folder or hub name (default: the one the adapter names)"
    )
    parser.add_argument("--adapter", required=True, help="adapter folder")
    parser.add_argument("--prompt", required=True, action="append", help="prompt (repeat for several)")
    parser.add_argument("--max-new-tokens", type=int, default=40, help="tokens to generate per prompt")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    parser.add_argument(
        "--dtype", type=dtypes.argument, default="fp32", help=f"dtype of the base model: {dtypes.HELP}"
    )
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not args.temperature >= 0 or args.temperature == float("inf"):
        raise ConfigError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    from deltatune.train.config import MAX_SEED  # as a training run's seed

    if not 0 <= args.seed <= MAX_SEED:
        raise ConfigError(
            f"--seed must be an integer from 0 to {MAX_SEED} (2**32 - 1), got {short(args.seed, 40)}"
        )
    for prompt in args.prompt:
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:  # bytes that aren't UTF-8 reach Python as lone surrogates
            raise ConfigError(
                f"--prompt {short(prompt, 60)} is not UTF-8 text (at character {e.start}): pass the prompt in "
                "UTF-8 (a terminal with a UTF-8 locale)"
            ) from None
    model, base_path, info = _load(args.base, args.adapter, dtypes.torch_dtype(args.dtype))
    tokenizer = load_tokenizer(adapter_dir(args.adapter), base_path)
    if info["task_type"] == "SEQ_CLS" or not hasattr(model.get_base_model(), "generate"):
        return _classify(model, tokenizer, args.prompt, info)
    for text in generate_texts(
        model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.seed
    ):
        print(text)
    return 0


def load_tokenizer(adapter: str, base_path: str) -> Any:
    """The adapter's own tokenizer when it was saved with one (deltatune train does), else the base's;
    left padding and a pad token, ready for batched generation."""
    from deltatune.vocab import fix_pad_token
    from deltatune.vocab import load_tokenizer as checked_tokenizer

    tokenizer = checked_tokenizer(
        adapter if os.path.isfile(os.path.join(adapter, "tokenizer_config.json")) else base_path
    )

    fix_pad_token(tokenizer)
    tokenizer.padding_side = "left"
    return tokenizer


def generate_texts(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int = 40,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[str]:
    """Prompt + continuation for each prompt (greedy when `temperature` is 0): `deltatune generate`'s output,
    also used by `deltatune ui`'s playground."""
    import torch

    batch = tokenizer(list(prompts), return_tensors="pt", padding=True)
    _refuse_empty(prompts, batch)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    limit = context_length(getattr(base, "config", None), tokenizer)
    longest = batch["input_ids"].shape[-1]
    if limit is not None and longest + max_new_tokens > limit:
        raise ConfigError(
            f"a prompt of {longest} tokens and {max_new_tokens} new tokens go beyond this model's {limit} positions: "
            f"ask for at most {max(limit - longest, 0)} new tokens, or shorten the prompt"
        )
    torch.manual_seed(seed)
    sample = temperature > 0
    with torch.no_grad():
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            pad_token_id=tokenizer.pad_token_id,
            **({"temperature": temperature} if sample else {}),
        )
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in out]


def _refuse_empty(prompts: list[str], batch: Any) -> None:
    """A prompt that tokenizes to nothing (an empty one, with a tokenizer that adds no start token) can't be run."""
    empty = [p for p, n in zip(prompts, batch["attention_mask"].sum(-1).tolist()) if n == 0]
    if empty:
        raise ConfigError(
            f"the prompt {short(empty[0], 60)} gives no tokens with this tokenizer (it adds no start token to "
            "stand in): give some text"
        )


def _classify(model: Any, tokenizer: Any, prompts: list[str], info: dict) -> int:
    import torch

    if info["task_type"] != "SEQ_CLS":
        raise ConfigError(
            f"the adapter's task is {info['task_type']}, and its base model can't generate text; "
            "use a causal-LM adapter with `deltatune generate`"
        )
    print(
        "this is a classification adapter: classifying each prompt (label, probability, text)",
        file=sys.stderr,
    )
    tokenizer.padding_side = "right"  # BERT-like heads read the first token
    batch = tokenizer(prompts, return_tensors="pt", padding=True, truncation=True)
    _refuse_empty(prompts, batch)
    with torch.no_grad():
        probs = model(**batch).logits.float().softmax(-1)
    id2label = getattr(model.get_base_model().config, "id2label", None) or {}
    for prompt, row in zip(prompts, probs):
        best = int(row.argmax())
        print(f"{id2label.get(best, str(best))}\t{row[best].item():.3f}\t{prompt}")
    return 0
