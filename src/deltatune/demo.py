"""`deltatune demo`: LoRA on the embedded MiniLM in a minute — wrap, train, save, reload, merge."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

from deltatune.cli import HelpFormatter
from deltatune.embedded import DEFAULT_MODEL, minilm_path

SENTENCES = [
    ("WINNER!! Claim your free prize now, click the link", 1),
    ("Lowest price pills, no prescription needed, order today", 1),
    ("You have been selected for a cash reward, reply with your bank details", 1),
    ("Exclusive deal: 90% off watches, limited time only", 1),
    ("Can we move tomorrow's meeting to 3pm?", 0),
    ("Here are the slides from today's review, comments welcome", 0),
    ("Lunch on Friday? The new place near the office", 0),
    ("The invoice for March is attached, thanks for your patience", 0),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="deltatune demo", description=__doc__, formatter_class=HelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30, help="training steps")
    parser.add_argument(
        "--out", default=None, help="where to keep the adapter (default: a temp folder, removed at the end)"
    )
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    from deltatune.checkpoint import first_missing, remove_made, unwritable

    made = first_missing(args.out) if args.out is not None else None  # the folders this demo makes for --out
    if args.out is not None and (why := unwritable(args.out)):
        parser.error(f"--out {args.out}: {why}; give a folder the adapter can be saved in")
    try:
        return _run(args)
    except BaseException:  # a failed or interrupted demo leaves none of the folders it made for --out
        if made is not None:
            shutil.rmtree(args.out, ignore_errors=True)
            remove_made(os.path.dirname(os.path.abspath(args.out)), made)
        raise


def _run(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from deltatune import LoraConfig, get_peft_model

    torch.manual_seed(0)
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    texts, labels = zip(*SENTENCES)
    batch = tokenizer(list(texts), padding=True, return_tensors="pt")
    labels = torch.tensor(labels)

    config = LoraConfig(r=8, lora_alpha=16, task_type="SEQ_CLS", base_model_name_or_path=DEFAULT_MODEL)
    model = get_peft_model(model, config)
    print(f"1. wrapped all-MiniLM-L6-v2 ({path}) with LoRA r=8 on query/value, classifier head trained")
    model.print_trainable_parameters()

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    start = time.perf_counter()
    for step in range(args.steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 0:
            first = loss.item()
    print(
        f"2. trained {args.steps} steps on {len(texts)} sentences in {time.perf_counter() - start:.1f}s: "
        f"loss {first:.3f} -> {loss.item():.3f}"
    )

    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
    if args.out is not None:
        _save_reload_merge(model, batch, labels, logits, path, args.out, kept=True)
    else:
        with tempfile.TemporaryDirectory(prefix="deltatune-demo-") as out:
            _save_reload_merge(model, batch, labels, logits, path, out, kept=False)
    return 0


def _save_reload_merge(model, batch, labels, logits, path: str, out: str, *, kept: bool) -> None:
    """Steps 3-5: save the adapter to `out`, reload it onto a fresh base, merge it; each compared to `logits`."""
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForSequenceClassification

    from deltatune import PeftModel
    from deltatune.checkpoint import CONFIG_NAME, WEIGHTS_NAME, write_failure
    from deltatune.errors import CheckpointError

    try:
        model.save_pretrained(out)
    except (OSError, SafetensorError) as e:  # a full disk, `ulimit -f`: safetensors says neither
        raise CheckpointError(f"could not save the adapter to {out}: {write_failure(e, out)}") from e
    # the adapter's own two files: `--out` may be a folder that holds other things too
    size = sum(os.path.getsize(os.path.join(out, f)) for f in (CONFIG_NAME, WEIGHTS_NAME))
    where = out if kept else f"a temp folder ({out}, removed at the end; --out FOLDER keeps it)"
    print(
        f"3. saved the adapter to {where}: {size / 1024:.0f} KiB; the base model is "
        f"{os.path.getsize(os.path.join(path, 'model.safetensors')) / 2**20:.0f} MiB"
    )
    reloaded = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(path, num_labels=2), out
    )
    with torch.no_grad():
        again = reloaded(**batch).logits
    print(f"4. reloaded it onto a fresh base: max |diff| = {(again - logits).abs().max().item():.2e}")

    merged = reloaded.merge_and_unload()
    with torch.no_grad():
        merged_logits = merged(**batch).logits
    print(
        f"5. merged into the base ({type(merged).__name__}, no adapter layers left): "
        f"max |diff| = {(merged_logits - logits).abs().max().item():.2e}"
    )
    accuracy = (merged_logits.argmax(-1) == labels).float().mean().item()
    print(f"   training-set accuracy of the merged model: {accuracy:.0%}")
