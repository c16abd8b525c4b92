"""Bottleneck adapters: `h + up(act(down(h)))` on a block's output projections (Houlsby et al., 2019;
Pfeiffer et al., 2020).

Houlsby ("AdapterH") puts one adapter on the output of each block's attention output projection and one
on its feed-forward output projection, before the residual add; Pfeiffer/Lin ("AdapterL") puts one per
block, after the feed-forward output projection. The wrapper owns the frozen projection as `base_layer`
next to `adapter_down`/`adapter_up` dicts keyed by adapter name, so no model class is patched: where the
projections live is a small table by `config.model_type`, or patterns the user passes.

Unlike LoRA, an adapter has a non-linearity between its two projections, so it cannot be folded into the
base weights: it always adds inference latency.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from deltatune import inject
from deltatune.config import BottleneckConfig
from deltatune.methods import modules_to_save as mts
from deltatune.methods import registry
from deltatune.methods.mixed import BASE, MIXED, MixedBatch, rows_view
from deltatune.vocab import is_conv1d, shape_of

HOLDERS = ("adapter_down", "adapter_up")

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "swish": F.silu,
    "silu": F.silu,
    "tanh": torch.tanh,
}

# Where each block's attention output and feed-forward output projections live, by `config.model_type`
# (the syntax of LoRA's `target_modules`: names/suffixes, or a full-match regex). In BERT-like encoders the
# FFN's projection is the block's own `output.dense`, not the `attention.output.dense` inside it.
_BERT_LIKE = (["attention.output.dense"], r".*\.\d+\.output\.dense")
PLACEMENTS: dict[str, tuple[list[str] | str, list[str] | str]] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "distilbert": (["attention.out_lin"], ["ffn.lin2"]),
    "gpt2": (["attn.c_proj"], ["mlp.c_proj"]),
    "opt": (["self_attn.out_proj"], ["fc2"]),
    "llama": (["self_attn.o_proj"], ["mlp.down_proj"]),
    "mistral": (["self_attn.o_proj"], ["mlp.down_proj"]),
    "qwen2": (["self_attn.o_proj"], ["mlp.down_proj"]),
}

MERGE_ERROR = registry.method_type("BOTTLENECK").merge_error


def output_features(module: nn.Module) -> int:
    """The output width of a projection: `nn.Linear`, transformers' `Conv1D` (weight `[in, out]`) or a
    frozen quantized linear."""
    if is_conv1d(module):
        return int(module.nf)
    if hasattr(module, "out_features"):
        return int(module.out_features)
    raise ValueError(f"can't tell the output size of a {type(module).__name__}; adapters need a linear layer")


def _device(module: nn.Module) -> torch.device:
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


class BottleneckLayer(nn.Module):
    """A frozen projection followed by bottleneck adapters, one per adapter name.

    `init="zeros"`: `down` keeps `nn.Linear`'s Kaiming-uniform init, `up` (weight and bias) starts at zero,
    so the layer computes exactly its base projection at step 0; `up` gets a gradient at once and `down` from
    the second step on (as LoRA's A and B).

    `init="bert"` (AdapterHub's BERT-style init, after Houlsby's near-identity init): both weights are drawn
    from N(0, 0.02^2), both biases are zero. What keeps the output near the identity is the skip connection
    `h + ...` with small weights, zero biases (nothing shifts the output) and `act(0) = 0` for every supported
    non-linearity: the added term's norm is about `0.02^2 * sqrt(hidden * bottleneck) * ||h||` (over sqrt(2)
    for relu), about 5% of `||h||` at h=768, b=48 and 0.2% at h=32, b=2. It is not exactly the base model,
    so use "zeros" when step 0 must reproduce the base.
    """

    is_delta_layer = True
    supports_merge = False
    supports_mixed_batch = True
    merges_into_weight = False

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.hidden_size = output_features(base_layer)
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.adapter_dropout = nn.ModuleDict()
        self.non_linearity: dict[str, str] = {}
        self.active_adapters: list[str] = []
        self.disabled = False
        self.merged_adapters: list[str] = []  # always empty: adapters can't be merged

    @property
    def adapters(self) -> list[str]:
        return list(self.adapter_down)

    def add(self, name: str, config: BottleneckConfig) -> None:
        if name in self.adapter_down:
            raise ValueError(f"this layer already has an adapter named {name!r}")
        size = bottleneck_size(self.hidden_size, config.reduction_factor)
        device = _device(self.base_layer)
        down = nn.Linear(self.hidden_size, size, device=device, dtype=torch.float32)
        up = nn.Linear(size, self.hidden_size, device=device, dtype=torch.float32)
        with torch.no_grad():
            nn.init.zeros_(down.bias)
            nn.init.zeros_(up.bias)
            if config.init == "bert":
                nn.init.normal_(down.weight, std=0.02)
                nn.init.normal_(up.weight, std=0.02)
            else:
                nn.init.zeros_(up.weight)
        self.adapter_down[name] = down
        self.adapter_up[name] = up
        self.adapter_dropout[name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.non_linearity[name] = config.non_linearity
        self.set_active(self.active_adapters or [name])

    def set_active(self, names: Iterable[str]) -> None:
        self.active_adapters = [n for n in names if n in self.adapter_down]

    def delete(self, name: str) -> None:
        for holder in (self.adapter_down, self.adapter_up, self.adapter_dropout):
            if name in holder:
                del holder[name]
        self.non_linearity.pop(name, None)
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def merge(self, adapter_names: Iterable[str] | None = None) -> None:
        """Always raises: a bottleneck adapter has no weight delta to fold into the base."""
        raise ValueError(MERGE_ERROR)

    def merged_weight(self, adapter_names: Iterable[str]) -> torch.Tensor:
        """Always raises (asked for a quantized base): there is no merged weight."""
        raise ValueError(MERGE_ERROR)

    def unmerge(self) -> None:
        """Nothing is ever merged."""

    def reset_cache(self) -> None:
        """Nothing derived from the weights is kept."""

    def adapt(self, name: str, h: torch.Tensor) -> torch.Tensor:
        """`h + up(dropout(act(down(h))))` for adapter `name`, computed in the adapter's dtype."""
        down, up = self.adapter_down[name], self.adapter_up[name]
        z = ACTIVATIONS[self.non_linearity[name]](down(h.to(down.weight.dtype)))
        return h + up(self.adapter_dropout[name](z)).to(h.dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        mix = MIXED.get()
        if mix is not None:
            return self._forward_mixed(result, mix)
        for name in self.active_adapters:
            result = self.adapt(name, result)
        return result

    def _forward_mixed(self, result: torch.Tensor, mix: MixedBatch) -> torch.Tensor:
        groups = {n: rows for n, rows in mix.groups(set(self.adapters)).items() if n != BASE}
        if not groups:
            return result
        # Rows grouped by adapter: one adapter call per group, never a loop over rows.
        h = rows_view(result, len(mix))
        out = h.clone()
        for name, rows in groups.items():
            idx = torch.tensor(rows, device=h.device)
            out[idx] = self.adapt(name, h[idx])
        return out.reshape(result.shape)

    def extra_repr(self) -> str:
        sizes = {n: m.out_features for n, m in self.adapter_down.items()}
        return f"hidden_size={self.hidden_size}, bottleneck={sizes}, non_linearity={self.non_linearity}"


def bottleneck_size(hidden_size: int, reduction_factor: int) -> int:
    """`hidden_size // reduction_factor`, refusing a bottleneck of size 0."""
    size = hidden_size // reduction_factor
    if size < 1:
        raise ValueError(
            f"reduction_factor={reduction_factor} leaves a bottleneck of size 0 for hidden size {hidden_size} "
            f"({hidden_size} // {reduction_factor}); use reduction_factor <= {hidden_size}"
        )
    return size


def placement(model: nn.Module, config: BottleneckConfig) -> dict[str, list[str] | str]:
    """The patterns of the projections to adapt: `{"attention": ..., "ffn": ...}` (Houlsby) or `{"ffn": ...}`.

    The user's `attention_output_modules`/`ffn_output_modules` win; otherwise the table by `model_type`.
    """
    mtype = inject.model_type(model)
    known = PLACEMENTS.get(mtype) if mtype is not None else None
    wanted = {"attention": config.attention_output_modules, "ffn": config.ffn_output_modules}
    kinds = ("attention", "ffn") if config.style == "houlsby" else ("ffn",)
    out: dict[str, list[str] | str] = {}
    for i, kind in enumerate(("attention", "ffn")):
        if kind not in kinds:
            continue
        patterns = wanted[kind] or (known[i] if known is not None else None)
        if not patterns:
            needed = " and ".join(f"{k}_output_modules" for k in kinds if not wanted[k])
            raise ValueError(
                f"bottleneck adapters don't know where the {kind} output projections of model type {mtype!r} "
                f"are (known types: {', '.join(PLACEMENTS)}); pass {needed} (names, suffixes or a regex, as "
                f"LoRA's target_modules), e.g. ffn_output_modules=['mlp.down_proj']. Linear layers in this "
                f"model: {inject.suggest(model, inject.is_linear_like)}"
            )
        out[kind] = patterns
    return out


def _find(model: nn.Module, patterns: Sequence[str] | str, kind: str, skip: Sequence[str]) -> list[str]:
    """Names of the projections matching `patterns` (an already wrapped one counts as itself)."""
    wrappers = [n for n, m in model.named_modules() if isinstance(m, BottleneckLayer)]
    found = []
    for name, _ in model.named_modules():
        if not name or not inject.matches(name, patterns) or mts.covered(name, skip):
            continue
        if ".modules_to_save." in name or name.endswith(".original_module"):
            continue
        inside = next((w for w in wrappers if name.startswith(f"{w}.")), None)
        if inside is not None:
            if name != f"{inside}.base_layer":
                continue
            name = inside
        found.append(name)
    found = list(dict.fromkeys(found))
    found = [n for n in found if not any(n.startswith(f"{o}.") for o in found)]
    what = f"{kind}_output_modules={patterns!r}"
    if not found:
        raise ValueError(
            f"{what} matched no module for the bottleneck adapters; pass the names (or suffixes, or a regex) of "
            f"each block's {kind} output projection. Linear layers in this model: "
            f"{inject.suggest(model, inject.is_linear_like)}"
        )
    bad = [
        n
        for n in found
        if not isinstance(inject.get_module(model, n), BottleneckLayer)
        and not inject.is_linear_like(inject.get_module(model, n))
    ]
    if bad:
        kinds = sorted({type(inject.get_module(model, n)).__name__ for n in bad})
        raise ValueError(
            f"{what} matched {bad[:5]} of type {', '.join(kinds)}; bottleneck adapters go on a linear output "
            f"projection. Linear layers in this model: {inject.suggest(model, inject.is_linear_like)}"
        )
    return found


def inject_adapter(
    model: nn.Module, config: BottleneckConfig, adapter_name: str, skip: Iterable[str] = ()
) -> list[str]:
    """Wrap each block's output projection(s) with a bottleneck adapter named `adapter_name`.

    Returns:
        The names of the adapted projections, attention ones first.

    Raises:
        ValueError: the projections can't be found (says which patterns to pass), a pattern matched a
            non-linear module, or `reduction_factor` leaves a bottleneck of size 0.
    """
    skip = list(skip)
    sites = {kind: _find(model, p, kind, skip) for kind, p in placement(model, config).items()}
    if len(sites) == 2:
        both = sorted(set(sites["attention"]) & set(sites["ffn"]))
        if both:
            raise ValueError(
                f"{both[:5]} matched both attention_output_modules and ffn_output_modules; "
                "each projection takes one adapter"
            )
    targets = [n for names in sites.values() for n in names]
    # Check every size before wrapping anything, so a bad reduction_factor leaves the model untouched.
    for name in targets:
        module = inject.get_module(model, name)
        base = module.base_layer if isinstance(module, BottleneckLayer) else module
        bottleneck_size(output_features(base), config.reduction_factor)
        if isinstance(module, BottleneckLayer) and adapter_name in module.adapters:
            raise ValueError(f"module {name!r} already has an adapter named {adapter_name!r}")
    for name in targets:
        module = inject.get_module(model, name)
        if not isinstance(module, BottleneckLayer):
            module = BottleneckLayer(module)
            inject.replace_module(model, name, module)
        module.add(adapter_name, config)
    return targets


def adapter_param_names(model: nn.Module, config: BottleneckConfig, adapter_name: str) -> list[str]:
    """The down/up weights and biases of `adapter_name` in every wrapped projection."""
    marks = tuple(f".{h}.{adapter_name}." for h in HOLDERS)
    return [n for n, _ in model.named_parameters() if any(m in n for m in marks)]


# PEFT-style saved names drop the adapter name: `dense.adapter_down.default.weight` <-> `dense.adapter_down.weight`.
def saved_key(name: str, adapter_name: str) -> str:
    for holder in HOLDERS:
        name = name.replace(f".{holder}.{adapter_name}.", f".{holder}.")
    return name


def internal_key(key: str, adapter_name: str) -> str:
    for holder in HOLDERS:
        key = key.replace(f".{holder}.", f".{holder}.{adapter_name}.")
    return key


def prepare_config(config: BottleneckConfig, model: nn.Module) -> None:
    """Nothing to fill in: the placement is found when injecting."""


def after_load(model: nn.Module, adapter_name: str) -> None:
    """Nothing to refresh."""


def summarize(tensors: dict[str, torch.Tensor]) -> dict:
    """The projections that carry adapters, and the bottleneck sizes."""
    modules = sorted({k.split(".adapter_down.")[0] for k in tensors if ".adapter_down." in k})
    sizes = sorted({shape_of(t)[0] for k, t in tensors.items() if k.endswith(".adapter_down.weight")})
    return {"adapted_modules": modules, "bottleneck_sizes": sizes}
