"""Find where a method goes in a model and swap modules in and out. Knows no method.

Name matching follows PEFT exactly, so a config means the same module set here and there:
a list matches full names or suffixes after a dot, a string is a regex full-matched against the full
module name, and `"all-linear"` is every linear layer but the output head.
"""

from __future__ import annotations

import contextlib
import re
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence

from torch import nn

ALL_LINEAR = "all-linear"

from deltatune.vocab import TASK_HEADS, is_conv1d  # noqa: E402

SEQ_CLS_HEADS = TASK_HEADS["SEQ_CLS"]


def model_type(model: nn.Module) -> str | None:
    """The Hugging Face `config.model_type` of a model, or None for a plain PyTorch model."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule at dotted path `name` (`""` is the model itself)."""
    return model.get_submodule(name) if name else model


_replacements = 0


def replacements() -> int:
    """How many modules `replace_module` has swapped so far (in any model): a cheap key for caches of where the
    adapter layers are, which a swap invalidates."""
    return _replacements


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` at dotted path `name`, in place of what was there."""
    parent_name, _, child = name.rpartition(".")
    setattr(get_module(model, parent_name), child, new)
    tree_changed()


def tree_changed() -> None:
    """Say that modules were swapped or added some other way than `replace_module` in a way that may add or remove
    adapter layers (a `modules_to_save` copy of a module holding some): the caches of `delta_layers` are dropped."""
    global _replacements
    _replacements += 1


_DELTA_LAYERS: weakref.WeakKeyDictionary[nn.Module, tuple[int, list[tuple[str, nn.Module]]]] = (
    weakref.WeakKeyDictionary()
)


def delta_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The adapter layers of `model` (`is_delta_layer`) and their names, in model order: one walk of the model,
    cached until a module is swapped (`replace_module`, through which every method injects and removes its layers,
    or `tree_changed`). Attaching an adapter and the mixed-batch checks on every forward look them up, and walking
    a large model's modules (hundreds of adapters' layers among them) each time is not free."""
    try:
        cached = _DELTA_LAYERS.get(model)
    except TypeError:  # a module class that isn't hashable: no cache
        cached = None
    if cached is None or cached[0] != _replacements:
        found = [(n, m) for n, m in model.named_modules() if getattr(m, "is_delta_layer", False)]
        cached = (_replacements, found)
        with contextlib.suppress(TypeError):
            _DELTA_LAYERS[model] = cached
    return list(cached[1])


def params_in(layers: Iterable[tuple[str, nn.Module]], keep: Callable[[str], bool]) -> list[str]:
    """The full names of the parameters inside `layers` (adapter layers and their names, in model order, as
    `delta_layers` lists them) that `keep`, named and ordered as `model.named_parameters()` would: an adapter's
    parameters live in its layers, so the rest of the model needn't be walked to find them."""
    names: list[str] = []
    outer: str | None = None
    for layer_name, layer in layers:
        if outer is not None and layer_name.startswith(f"{outer}."):
            continue  # inside the layer before (a modules_to_save copy of a module holding one): walked already
        outer = layer_name
        names += [n for n, _ in layer.named_parameters(prefix=layer_name) if keep(n)]
    return list(dict.fromkeys(names))


def _outside_delta_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """`model.named_modules()` without what lies inside an adapter layer, but for its `base_layer` (itself, not
    its children): the modules `find_targets` may adapt, found without walking every loaded adapter's parts."""
    memo: set[nn.Module] = set()

    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
        memo.add(module)
        yield prefix, module
        if prefix and getattr(module, "is_delta_layer", False):
            base = module._modules.get("base_layer")
            if base is not None and base not in memo:
                memo.add(base)
                yield f"{prefix}.base_layer", base
            return
        for name, child in module._modules.items():
            if child is not None and child not in memo:
                yield from walk(child, f"{prefix}.{name}" if prefix else name)

    return walk(model, "")


def matches(name: str, patterns: str | Sequence[str] | None) -> bool:
    """PEFT's rule: a string is a full-match regex; a list matches exact names or `.suffix`es."""
    if not patterns:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return name in patterns or any(name.endswith(f".{p}") for p in patterns)


def layer_index(name: str, layers_pattern: str | Sequence[str] | None = None) -> int | None:
    """The block index in a module name (`model.layers.3.mlp` -> 3), PEFT's way."""
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
        return int(m.group("idx")) if m else None
    for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
        m = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
        if m:
            return int(m.group("idx"))
    return None


def pattern_key(keys: Iterable[str], name: str) -> str | None:
    """The `rank_pattern`/`alpha_pattern` key that applies to module `name` (PEFT's rule), if any."""
    for key in keys:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear, transformers' Conv1D (duck-typed), or a frozen quantized linear of deltatune."""
    return isinstance(module, nn.Linear) or is_conv1d(module) or getattr(module, "is_quantized_linear", False)


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the modules that produce the model's final outputs (never targeted by `all-linear`)."""
    heads: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if out is not None and module is out:
            heads.add(name)
    if not heads:
        for head in SEQ_CLS_HEADS:
            if isinstance(getattr(model, head, None), nn.Module):
                heads.add(head)
                break
    return heads


class NoTargetsError(ValueError):
    """`target_modules` (or `modules_to_save`) matched no module of the model."""


def find_targets(
    model: nn.Module,
    target_modules: str | Sequence[str] | None,
    *,
    adaptable: Callable[[nn.Module], bool],
    exclude_modules: str | Sequence[str] | None = None,
    skip: Sequence[str] = (),
    layers_to_transform: int | Sequence[int] | None = None,
    layers_pattern: str | Sequence[str] | None = None,
    what: str = "adapt",
) -> list[str]:
    """Names of the modules to adapt, in model order.

    Raises:
        ValueError: nothing matched, or a matched module is of a type that can't be adapted; the message
            lists the model's adaptable module names.
    """
    if target_modules is None:
        raise ValueError(
            f"target_modules is None; pass target_modules explicitly. Adaptable modules: {suggest(model, adaptable)}"
        )
    # The parts of adapter layers (an adapter layer's lora_A, say) are never adapted, so they aren't walked; the
    # base_layer of one stands for the layer.
    modules = list(_outside_delta_layers(model))
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        heads = output_head_names(model)
        candidates = [n for n, m in modules if n and is_linear_like(m) and n not in heads]
    else:
        candidates = [n for n, _ in modules if n and matches(n, target_modules)]
    if layers_to_transform is not None:
        wanted = {layers_to_transform} if isinstance(layers_to_transform, int) else set(layers_to_transform)
        candidates = [n for n in candidates if layer_index(n, layers_pattern) in wanted]
    candidates = [
        n
        for n in candidates
        if not matches(n, exclude_modules) and not any(re.match(rf"(^|.*\.){s}($|\..*)", n) for s in skip)
    ]
    wrapped = [n for n, m in modules if n and getattr(m, "is_delta_layer", False)]
    candidates = [
        n
        for n in candidates
        if not any(n.startswith(f"{w}.") for w in wrapped) or any(n == f"{w}.base_layer" for w in wrapped)
    ]
    # Never nest: drop a candidate that sits inside another candidate.
    candidates = [n for n in candidates if not any(n.startswith(f"{o}.") for o in candidates)]
    bad = [n for n in candidates if not adaptable(get_module(model, n))]
    if bad:
        kinds = sorted({type(get_module(model, n)).__name__ for n in bad})
        raise ValueError(
            f"target_modules matched {bad[:5]}{'...' if len(bad) > 5 else ''} of type {', '.join(kinds)}, which can't "
            f"be adapted. Adaptable modules: {suggest(model, adaptable)}"
        )
    if not candidates:
        hint = ""
        if isinstance(target_modules, str) and any(matches(n, [target_modules]) for n, _ in modules if n):
            hint = (
                f" (a string is a full-match regex over the whole module name, PEFT's rule: for the modules "
                f"named {target_modules!r} pass a list, target_modules=[{target_modules!r}])"
            )
        raise NoTargetsError(
            f"target_modules={target_modules!r} matched no module to {what}{hint}. "
            f"Adaptable modules in this model: {suggest(model, adaptable)}"
        )
    return candidates


def suggest(model: nn.Module, adaptable: Callable[[nn.Module], bool]) -> str:
    """A short list of the model's adaptable module names (suffixes, then a few full names)."""
    # not the parts of adapter layers already in the model (their lora_A.<name>, say): a wrapped layer is listed
    # by its own name
    names = [n.removesuffix(".base_layer") for n, m in _outside_delta_layers(model) if n and adaptable(m)]
    names = list(dict.fromkeys(names))
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    return f"suffixes {suffixes}; e.g. {names[:4]}" if names else "none found"


def fill_default(
    config: object,
    field: str,
    table: dict[str, Sequence[str]],
    model: nn.Module,
    adaptable: Callable[[nn.Module], bool],
    method: str = "",
) -> None:
    """`config.<field>` left None: PEFT's default for the model's architecture from `table`.

    Raises:
        ValueError: the architecture has no default; says what to pass and lists the adaptable modules.
    """
    if getattr(config, field) is not None:
        return
    mtype = model_type(model)
    if mtype not in table:
        raise ValueError(
            f"{field} is None and there is no {method + ' ' if method else ''}default for model type {mtype!r}; "
            f"pass {field} explicitly. Adaptable modules: {suggest(model, adaptable)}"
        )
    setattr(config, field, list(table[mtype]))


def find_blocks(model: nn.Module, blocks_module: str | None = None) -> tuple[str, nn.ModuleList]:
    """The model's main list of transformer blocks: the `nn.ModuleList` holding the most parameters.

    Raises:
        ValueError: no list of blocks was found (or `blocks_module` isn't one); says how to pass it.
    """
    if blocks_module is not None:
        try:
            found = get_module(model, blocks_module)
        except AttributeError:
            found = None
        if not isinstance(found, nn.ModuleList):
            lists = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
            raise ValueError(
                f"blocks_module={blocks_module!r} is not an nn.ModuleList in this model; its ModuleLists: "
                f"{lists or 'none'}"
            )
        return blocks_module, found
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[0]:
                best = (size, name, module)
    if best is None:
        raise ValueError(
            "could not find the model's transformer blocks (no nn.ModuleList of layers); pass "
            "blocks_module='<dotted name of the ModuleList>' explicitly"
        )
    return best[1], best[2]
