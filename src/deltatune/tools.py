"""`deltatune inspect | merge | generate`: look at an adapter, bake it into its base, try it."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile

import torch

from deltatune import checkpoint
from deltatune.config import load_config
from deltatune.embedded import resolve_model
from deltatune.model import PeftModel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
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


def load_base(
    path: str,
    task_type: str | None,
    num_labels: int | None = None,
    dtype: torch.dtype = torch.float32,
    meta: bool = False,
) -> torch.nn.Module:
    """The base model for an adapter's task type (weights on the meta device when `meta`: shapes only)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    if not os.path.isdir(path) and os.path.exists(path):
        raise FileNotFoundError(f"base model {path!r} is a file; give a Hugging Face model folder")
    auto = {"SEQ_CLS": AutoModelForSequenceClassification, "CAUSAL_LM": AutoModelForCausalLM}.get(
        task_type or ""
    )
    config = AutoConfig.from_pretrained(path)
    if auto is None:
        auto = (
            AutoModelForCausalLM
            if any(a.endswith("ForCausalLM") for a in config.architectures or [])
            else AutoModel
        )
    kwargs = {"num_labels": num_labels} if auto is AutoModelForSequenceClassification and num_labels else {}
    if meta:
        for key, value in kwargs.items():
            setattr(config, key, value)
        with torch.device("meta"):
            return auto.from_config(config, dtype=dtype)
    return auto.from_pretrained(path, dtype=dtype, **kwargs).eval()


def _adapter_summary(directory: str) -> dict:
    config = load_config(directory)
    tensors = checkpoint.load_adapter_weights(directory)
    weights_file = next(
        os.path.join(directory, n)
        for n in (checkpoint.WEIGHTS_NAME, checkpoint.LEGACY_WEIGHTS_NAME)
        if os.path.isfile(os.path.join(directory, n))
    )
    modules = sorted(
        {k.removeprefix(checkpoint.KEY_PREFIX).split(".lora_")[0] for k in tensors if ".lora_" in k}
    )
    ranks = sorted(
        {
            t.shape[0]
            for k, t in tensors.items()
            if k.endswith("lora_A.weight") or k.endswith("lora_embedding_A")
        }
    )
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
        "adapted_modules": modules,
        "ranks": ranks,
        "tensors": len(tensors),
        "parameters": sum(t.numel() for t in tensors.values()),
        "file_bytes": os.path.getsize(weights_file),
        "num_labels": checkpoint.head_num_labels(tensors),
    }


def inspect_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="deltatune inspect", description="Show an adapter; with --base, check it fits."
    )
    parser.add_argument("adapter", help="adapter directory")
    parser.add_argument("--base", help="base model folder to check compatibility against (nothing is loaded)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    info = _adapter_summary(args.adapter)
    if args.base:
        base = load_base(resolve_model(args.base), info["task_type"], info["num_labels"], meta=True)
        try:
            PeftModel.from_pretrained(base, args.adapter)
            info["compatible"], info["problems"] = True, ""
        except checkpoint.CheckpointError as e:
            info["compatible"], info["problems"] = False, str(e)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"adapter      {info['directory']}")
        print(f"method       {info['method']}  task {info['task_type']}")
        print(f"trained on   {info['base_model']}")
        print(f"rank(s)      {info['ranks']}")
        print(
            f"modules      {len(info['adapted_modules'])}: {', '.join(info['adapted_modules'][:6])}"
            f"{' ...' if len(info['adapted_modules']) > 6 else ''}"
        )
        print(
            f"parameters   {info['parameters']:,d} in {info['tensors']} tensors, file {info['file_bytes'] / 1024:.1f} KiB"
        )
        print("config       " + json.dumps(info["config"], sort_keys=True))
        if args.base:
            verdict = "fits" if info["compatible"] else "does NOT fit"
            print(f"base         {args.base}: {verdict}")
            if info["problems"]:
                print(info["problems"])
    return 0 if info.get("compatible", True) else 1


def _load(base_path: str, adapter: str, dtype: torch.dtype) -> tuple[PeftModel, str]:
    info = _adapter_summary(adapter)
    base_path = resolve_model(base_path or info["base_model"])
    base = load_base(base_path, info["task_type"], info["num_labels"], dtype=dtype)
    return PeftModel.from_pretrained(base, adapter), base_path


def merge_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="deltatune merge", description="Merge an adapter into its base model."
    )
    parser.add_argument("--base", default=None, help="base model folder (default: the one the adapter names)")
    parser.add_argument("--adapter", required=True, help="adapter directory")
    parser.add_argument("--out", required=True, help="output folder for the merged model (must not exist)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="dtype of the merged model")
    args = parser.parse_args(argv)
    if os.path.exists(args.out):
        print(f"deltatune merge: {args.out!r} exists already; pick a new folder", file=sys.stderr)
        return 2
    model, base_path = _load(args.base, args.adapter, DTYPES[args.dtype])
    merged = model.merge_and_unload(dtype=DTYPES[args.dtype])
    parent = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".merge-", dir=parent)
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        for folder in (base_path, args.adapter):
            for name in _TOKENIZER_FILES:
                if os.path.isfile(os.path.join(folder, name)):
                    shutil.copy2(os.path.join(folder, name), os.path.join(tmp, name))
        os.rename(tmp, args.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"merged {args.adapter} into {base_path} -> {args.out} ({type(merged).__name__}, {args.dtype})")
    return 0


def generate_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="deltatune generate", description="Generate text with a base and an adapter."
    )
    parser.add_argument("--base", default=None, help="base model folder (default: the one the adapter names)")
    parser.add_argument("--adapter", required=True, help="adapter directory")
    parser.add_argument("--prompt", required=True, action="append", help="prompt (repeat for several)")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    model, base_path = _load(args.base, args.adapter, torch.float32)
    tokenizer = load_tokenizer(args.adapter, base_path)
    for text in generate_texts(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.seed):
        print(text)
    return 0


def load_tokenizer(adapter: str, base_path: str):
    """The adapter's own tokenizer when it was saved with one (deltatune train does), else the base's;
    left padding and a pad token, ready for batched generation."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        adapter if os.path.isfile(os.path.join(adapter, "tokenizer_config.json")) else base_path
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def generate_texts(
    model, tokenizer, prompts: list[str], max_new_tokens: int = 40, temperature: float = 0.0, seed: int = 0
) -> list[str]:
    """Prompt + continuation for each prompt (greedy when `temperature` is 0): `deltatune generate`'s output,
    also used by `deltatune ui`'s playground."""
    batch = tokenizer(list(prompts), return_tensors="pt", padding=True)
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
