"""The playground: one base in memory with one or two adapters, answers side by side.

Loading and generation are `deltatune generate`'s own (`tools.load_base`, `tools.load_tokenizer`,
`tools.generate_texts`); the adapters are loaded by name on one base (`PeftModel.load_adapter`) and chosen
with `set_adapter`, the base's own answer under `disable_adapter()`. Classification adapters answer with their
labels' probabilities.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

import torch

MAX_ADAPTERS = 2
MAX_NEW_TOKENS = 256


class PlaygroundError(ValueError):
    pass


def _labels(adapter: str, num: int) -> list[str]:
    try:
        with open(os.path.join(adapter, "label_map.json"), encoding="utf-8") as f:
            label_map = json.load(f)
        by_id = {int(v): str(k) for k, v in label_map.items()}
        return [by_id.get(i, str(i)) for i in range(num)]
    except (OSError, ValueError, AttributeError, TypeError):
        return [str(i) for i in range(num)]


class Playground:
    """Keeps the last loaded base + adapters (loading is the slow part); one request at a time."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.key: tuple | None = None
        self.loaded: dict[str, Any] = {}

    def _load(self, base: str | None, adapters: list[str]) -> dict[str, Any]:
        from deltatune import tools
        from deltatune.embedded import resolve_model
        from deltatune.model import PeftModel

        key = (base, tuple(adapters))
        if key == self.key:
            return self.loaded
        self.key, self.loaded = None, {}
        infos = []
        for path in adapters:
            if not os.path.isfile(os.path.join(path, "adapter_config.json")):
                raise PlaygroundError(f"{path!r} is not an adapter folder (no adapter_config.json)")
            infos.append(tools._adapter_summary(path))
        tasks = {i["task_type"] for i in infos}
        if len(tasks) > 1:
            raise PlaygroundError(
                "the adapters were trained for different tasks ("
                + ", ".join(map(str, sorted(tasks, key=str)))
                + "); pick adapters of one task"
            )
        labels = {i["num_labels"] for i in infos}
        if len(labels) > 1:
            raise PlaygroundError(
                "the classification adapters have different label counts; pick one at a time"
            )
        base_path = resolve_model(base or (infos[0]["base_model"] if infos else ""))
        if not base_path:
            raise PlaygroundError("pick a base model folder (or an adapter that names its base)")
        if not os.path.isdir(base_path):
            raise PlaygroundError(f"base model folder {base_path!r} does not exist")
        task = infos[0]["task_type"] if infos else None
        num_labels = infos[0]["num_labels"] if infos else None
        if not adapters and _is_classifier(base_path):  # a classifier base alone answers with its own head
            task = "SEQ_CLS"
        model = tools.load_base(base_path, task, num_labels)
        slots = []  # (model, adapter name) per adapter
        for i, path in enumerate(adapters):
            name = f"adapter{i + 1}"
            if i == 0:
                model = PeftModel.from_pretrained(model, path, adapter_name=name)
            else:
                try:
                    model.load_adapter(path, adapter_name=name)
                except (
                    ValueError
                ):  # another kind of method (LoRA next to bottleneck): its own copy of the base
                    other = PeftModel.from_pretrained(
                        tools.load_base(base_path, task, num_labels), path, adapter_name=name
                    ).eval()
                    slots.append((other, name))
                    continue
            slots.append((model, name))
        model.eval()
        tokenizers = [tools.load_tokenizer(path, base_path) for path in adapters]
        if not adapters:
            tokenizers = [tools.load_tokenizer(base_path, base_path)]
        classify = task == "SEQ_CLS"
        self.loaded = {
            "model": model,
            "slots": slots,
            "adapters": list(adapters),
            "tokenizers": tokenizers,
            "base_path": base_path,
            "classify": classify,
        }
        self.key = key
        return self.loaded

    def answer(
        self,
        base: str | None,
        adapters: list[str],
        prompt: str,
        max_new_tokens: int = 40,
        temperature: float = 0.0,
        seed: int = 0,
        include_base: bool = True,
    ) -> dict[str, Any]:
        from deltatune import tools

        adapters = [a for a in adapters if a]
        if len(adapters) > MAX_ADAPTERS:
            raise PlaygroundError(f"pick at most {MAX_ADAPTERS} adapters")
        if not prompt.strip():
            raise PlaygroundError("type a prompt (or a text to classify)")
        if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
            raise PlaygroundError(f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS}")
        with self.lock:
            loaded = self._load(base or None, adapters)
            model = loaded["model"]
            answers = []

            def run(tokenizer, model=model) -> dict[str, Any]:
                if loaded["classify"]:
                    batch = tokenizer([prompt], return_tensors="pt", padding=True)
                    with torch.no_grad():
                        probs = torch.softmax(model(**batch).logits.float(), -1)[0].tolist()
                    return {"scores": probs}
                (text,) = tools.generate_texts(model, tokenizer, [prompt], max_new_tokens, temperature, seed)
                return {"text": text}

            if include_base and not loaded["classify"] or not adapters:
                if adapters:
                    with model.disable_adapter():
                        answers.append(
                            {"name": "base", "path": loaded["base_path"], **run(loaded["tokenizers"][0])}
                        )
                else:
                    answers.append(
                        {"name": "base", "path": loaded["base_path"], **run(loaded["tokenizers"][0])}
                    )
            for (holder, name), path, tokenizer in zip(
                loaded["slots"], loaded["adapters"], loaded["tokenizers"]
            ):
                holder.set_adapter(name)
                answer = {"name": os.path.basename(os.path.dirname(path.rstrip("/"))) or name, "path": path}
                answer.update(run(tokenizer, holder))
                if "scores" in answer:
                    answer["labels"] = _labels(path, len(answer["scores"]))
                answers.append(answer)
            return {"task": "classify" if loaded["classify"] else "generate", "answers": answers}


def _is_classifier(base_path: str) -> bool:
    """Whether a model folder's config names a sequence classifier (its head is loaded only for that task)."""
    from transformers import AutoConfig

    try:
        architectures = AutoConfig.from_pretrained(base_path).architectures or []
    except (OSError, ValueError):
        return False  # load_base says what is wrong with the folder
    return any(a.endswith("ForSequenceClassification") for a in architectures)
