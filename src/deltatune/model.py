"""The wrapped model: a base model plus named deltas (adapters), PEFT's API and on-disk format.

`get_peft_model(model, config)` puts a method into the model in place and returns a `PeftModel`;
`PeftModel.from_pretrained(base, directory)` loads an adapter saved here or by PEFT.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
from collections.abc import Iterator

import torch
from torch import nn

from deltatune import checkpoint, inject
from deltatune.config import AnyConfig, load_config
from deltatune.errors import CheckpointError, NonFiniteWeightsError, short
from deltatune.methods import modules_to_save as mts
from deltatune.methods import registry
from deltatune.methods.mixed import BASE, MIXED, MixedBatch
from deltatune.vocab import TASK_HEADS, task_type_of

logger = logging.getLogger(__name__)

DEFAULT_ADAPTER = "default"
_TASK_LOGGED: set[tuple[str, str]] = set()


def get_peft_model(
    model: nn.Module, peft_config: AnyConfig, adapter_name: str = DEFAULT_ADAPTER
) -> PeftModel:
    """Put `peft_config`'s method into `model` (in place) and return the wrapped model.

    Args:
        model: a PyTorch or Hugging Face `transformers` model.
        peft_config: `LoraConfig`, `BottleneckConfig`, `TopLayersConfig` or `FullFinetuneConfig`.
        adapter_name: name of the first adapter.
    """
    return PeftModel(model, peft_config, adapter_name)


class PeftModel(nn.Module):
    """A base model with named adapters: forward/generate pass through, adapters merge, swap and save."""

    def __init__(self, model: nn.Module, peft_config: AnyConfig, adapter_name: str = DEFAULT_ADAPTER):
        super().__init__()
        if isinstance(model, PeftModel):
            raise ValueError(
                "this model is already wrapped; add another adapter to it with add_adapter(name, config), or "
                "load a saved one with load_adapter(path, adapter_name=...)"
            )
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"the base model must be a loaded torch.nn.Module, got {type(model).__name__} {short(model, 80)}; "
                "load it first, e.g. AutoModelForCausalLM.from_pretrained(path)"
            )
        held = [n for n, m in inject.delta_layers(model) if adapter_name in getattr(m, "adapters", ())]
        if held:
            raise ValueError(
                f"this model holds an adapter named {adapter_name!r} already (in {held[0]!r}): get_peft_model "
                "and PeftModel.from_pretrained change the model they are given in place. Load a fresh base "
                "model, or add the adapter to the PeftModel that wraps this one with load_adapter(path, "
                "adapter_name=...) or add_adapter(name, config)"
            )
        self.base_model = model
        self.peft_config: dict[str, AnyConfig] = {}
        self.active_adapter: str = adapter_name
        self._inject(adapter_name, peft_config)
        self.set_adapter(adapter_name)

    # ---- attribute passthrough -------------------------------------------------------------------
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
        try:
            return getattr(self.base_model, name)
        except AttributeError as e:
            if getattr(e, "name", None) not in (None, name):
                raise  # an AttributeError from inside one of the base model's own properties
            raise _MissingAttribute(self, name) from None

    def get_base_model(self) -> nn.Module:
        """The underlying model (with the adapter layers still in it)."""
        return self.base_model

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter]

    @property
    def adapter_names(self) -> list[str]:
        return list(self.peft_config)

    # ---- adding, choosing and removing adapters ----------------------------------------------------
    def _inject(self, adapter_name: str, config: AnyConfig) -> None:
        _check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} exists already; pick another name")
        kind = registry.method_type(config.peft_type)
        if self.peft_config:
            first = next(iter(self.peft_config.values()))
            if first.peft_type != config.peft_type or kind.in_place:
                raise ValueError(
                    f"this model holds a {first.peft_type} adapter; another {config.peft_type} adapter can't be added "
                    "to it (several adapters are supported for adapter methods of one kind, not for full/top-layer "
                    "fine-tuning)"
                )
        config = copy.deepcopy(config)  # the user's config object is never changed
        method = kind.load()
        _with_task_defaults(config, self.base_model)
        method.prepare_config(config, self.base_model)
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(self.base_model, "name_or_path", None) or None
        skip = config.modules_to_save or []
        try:
            method.inject_adapter(self.base_model, config, adapter_name, skip=skip)
            if config.modules_to_save:
                found = mts.inject_modules(self.base_model, config.modules_to_save, adapter_name)
                if not found and not _is_auto_heads(config):
                    raise inject.NoTargetsError(  # a ValueError; from a saved adapter, one that doesn't fit
                        f"modules_to_save={config.modules_to_save} matched no module of the model"
                    )
        except Exception:
            self._remove_from_layers(adapter_name)
            raise
        self.peft_config[adapter_name] = config

    def add_adapter(self, adapter_name: str, peft_config: AnyConfig) -> None:
        """Add a new, untrained adapter next to the existing ones (the active adapter doesn't change)."""
        self._inject(adapter_name, peft_config)
        self.set_adapter(self.active_adapter)

    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: int | None = None,
    ) -> None:
        """Add `adapter_name`, a weighted combination of LoRA `adapters` (PEFT's meanings).

        Args:
            adapters: names of loaded LoRA adapters.
            weights: one weight per adapter.
            adapter_name: name of the new adapter (it is not made active).
            combination_type: `"linear"` (same ranks; A's and B's mixed with `sqrt(w * scale)` weights, so the
                product has cross terms, as in PEFT), `"cat"` (ranks stacked: exactly `sum w_i dW_i`) or `"svd"`
                (the best rank-`svd_rank` approximation of `sum w_i dW_i`).
            svd_rank: rank of the `svd` result (default: the largest rank of `adapters`).
        """
        if not adapters or len(adapters) != len(weights):
            raise ValueError("add_weighted_adapter needs one weight per adapter, and at least one adapter")
        missing = [a for a in adapters if a not in self.peft_config]
        if missing:
            raise ValueError(f"no adapter(s) named {missing}; loaded adapters: {self.adapter_names}")
        configs = [self.peft_config[a] for a in adapters]
        combined = getattr(registry.module_for(configs[0].peft_type), "weighted_config", None)
        if combined is None or len({c.peft_type for c in configs}) > 1:
            raise ValueError("add_weighted_adapter combines plain LoRA adapters (not DoRA or other methods)")
        combination_type = "linear" if len(adapters) == 1 else combination_type
        config = combined(configs, combination_type, svd_rank)
        self.add_adapter(adapter_name, config)
        for _, layer in self._delta_layers():
            if adapter_name in layer.adapters and hasattr(layer, "combine"):
                layer.combine(adapter_name, adapters, list(weights), combination_type)
            elif adapter_name in layer.adapters:  # a modules_to_save copy: take the trained one, if only one
                sources = [a for a in adapters if a in layer.adapters]
                if len(sources) > 1:
                    self.delete_adapter(adapter_name)
                    raise ValueError(
                        "can't combine adapters that each train their own copy of the same module "
                        "(modules_to_save, e.g. a classification head)"
                    )
                if sources:
                    layer.modules_to_save[adapter_name].load_state_dict(
                        layer.modules_to_save[sources[0]].state_dict()
                    )

    def set_adapter(self, adapter_name: str) -> None:
        """Make `adapter_name` the active adapter; only its parameters train (unless in inference mode)."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"no adapter named {adapter_name!r}; loaded adapters: {self.adapter_names}")
        self.active_adapter = adapter_name
        for _, layer in self._delta_layers():
            layer.set_active([adapter_name])
        self._mark_trainable()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter and its weights; layers left with no adapter go back to plain layers."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"no adapter named {adapter_name!r}; loaded adapters: {self.adapter_names}")
        if len(self.peft_config) == 1:
            raise ValueError(
                f"{adapter_name!r} is the only adapter; use unload() to get the plain base model back"
            )
        self._remove_from_layers(adapter_name)
        del self.peft_config[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = next(iter(self.peft_config))
        self.set_adapter(self.active_adapter)

    def _remove_from_layers(self, adapter_name: str) -> None:
        for name, layer in self._delta_layers():
            if adapter_name in layer.adapters:
                layer.delete(adapter_name)
            if not layer.adapters:
                inject.replace_module(self.base_model, name, layer.base_layer)

    def _delta_layers(self) -> list[tuple[str, nn.Module]]:
        """The adapter layers and their names (`inject.delta_layers`: a walk of the model cached until a module is
        swapped; the mixed-batch checks run on every forward, and adding or removing an adapter looks them up)."""
        return inject.delta_layers(self.base_model)

    def _adapter_param_names(self, adapter_name: str) -> list[str]:
        config = self.peft_config[adapter_name]
        names = registry.module_for(config.peft_type).adapter_param_names(
            self.base_model, config, adapter_name
        )
        wrappers = [(n, m) for n, m in self._delta_layers() if isinstance(m, mts.ModulesToSave)]
        names += inject.params_in(wrappers, lambda n: mts.is_adapter_param(n, adapter_name))
        return list(dict.fromkeys(names))

    def _mark_trainable(self) -> None:
        for module in self.base_model.modules():  # `parameters()`, without its duplicate check (~30% faster)
            for p in module._parameters.values():
                if p is not None:
                    p.requires_grad_(False)
        config = self.peft_config[self.active_adapter]
        if config.inference_mode:
            return
        params = dict(self.base_model.named_parameters())
        for name in self._adapter_param_names(self.active_adapter):
            params[name].requires_grad_(True)

    # ---- forward -----------------------------------------------------------------------------------
    def _prepare_inputs(self, args: tuple, kwargs: dict, generate: bool = False) -> tuple[tuple, dict]:
        """Methods that change the inputs (virtual tokens, key/value prefixes) do so here."""
        method = registry.module_for(self.peft_config[self.active_adapter].peft_type)
        prepare = getattr(method, "prepare_inputs", None)
        if prepare is None:
            return args, kwargs
        return prepare(self, self.active_adapter, args, kwargs, generate=generate)

    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """The base model's forward; `adapter_names` gives each row of the batch its own adapter."""
        args, kwargs = self._prepare_inputs(args, kwargs)
        if adapter_names is None:
            return self.base_model(*args, **kwargs)
        with self._mixed_batch(adapter_names, args, kwargs):
            return self.base_model(*args, **kwargs)

    def generate(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """The base model's `generate`; `adapter_names` as in `forward`."""
        args, kwargs = self._prepare_inputs(args, kwargs, generate=True)
        if adapter_names is None:
            return self.base_model.generate(*args, **kwargs)
        with self._mixed_batch(adapter_names, args, kwargs):
            return self.base_model.generate(*args, **kwargs)

    @contextlib.contextmanager
    def _mixed_batch(self, adapter_names: list[str], args: tuple, kwargs: dict) -> Iterator[None]:
        if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
            raise ValueError("adapter_names must be a list with one adapter name per row of the batch")
        unknown = sorted({n for n in adapter_names if n != BASE and n not in self.peft_config})
        if unknown:
            raise ValueError(
                f"unknown adapter(s) {unknown} in adapter_names; loaded adapters: {self.adapter_names} (and '{BASE}')"
            )
        batch = _batch_size(args, kwargs)
        if batch is not None and batch != len(adapter_names):
            raise ValueError(f"adapter_names has {len(adapter_names)} entries but the batch has {batch} rows")
        if self.training:
            raise ValueError("mixed-adapter batches are for inference; call model.eval() first")
        if any(layer.merged_adapters for _, layer in self._delta_layers()):
            raise ValueError("mixed-adapter batches need unmerged adapters; call unmerge_adapter() first")
        kind = registry.method_type(self.peft_config[self.active_adapter].peft_type)
        if kind.in_place:
            raise ValueError(
                "mixed-adapter batches need adapters (LoRA, bottleneck, ...), not full/top-layer fine-tuning"
            )
        if not kind.mixed_batch or any(not layer.supports_mixed_batch for _, layer in self._delta_layers()):
            why = (
                " (their virtual tokens change the length and the keys/values of every row)"
                if kind.kind == "virtual_tokens"
                else ""
            )
            raise ValueError(
                f"{kind.peft_type} adapters don't support mixed-adapter batches{why}; run one adapter at a time "
                "(set_adapter)"
            )
        token = MIXED.set(MixedBatch(list(adapter_names)))
        try:
            yield
        finally:
            MIXED.reset(token)

    # ---- merging, disabling, unloading --------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None) -> None:
        """Merge the active adapter (or `adapter_names`) into the base weights; idempotent."""
        self._check_mergeable(adapter_names)
        layers = self._delta_layers()
        self._untie_merged_weights(layers)
        for _, layer in layers:
            layer.merge(adapter_names if adapter_names is not None else layer.active_adapters)

    def _untie_merged_weights(self, layers: list[tuple[str, nn.Module]]) -> None:
        """A merged weight shared with another module (tied input/output embeddings) would change that module
        too; give the adapted layer its own copy so the merged model computes what the adapter model did."""
        uses: dict[int, int] = {}
        for _, p in self.base_model.named_parameters(remove_duplicate=False):
            uses[id(p)] = uses.get(id(p), 0) + 1
        for name, layer in layers:
            weight = getattr(layer.base_layer, "weight", None)
            if not isinstance(weight, nn.Parameter) or uses.get(id(weight), 0) < 2 or layer.merged_adapters:
                continue
            if not layer.merges_into_weight:
                continue
            layer.base_layer.weight = nn.Parameter(
                weight.detach().clone(), requires_grad=weight.requires_grad
            )
            config = getattr(self.base_model, "config", None)
            if config is not None:
                config.tie_word_embeddings = False
            logger.warning(
                "%s shares its weight with another module (tied embeddings); merging unties it so the "
                "merged model computes what the adapter did (config.tie_word_embeddings=False)",
                name,
            )

    def _check_mergeable(self, adapter_names: list[str] | None) -> None:
        """A method that can't merge says so before anything changes."""
        for name in adapter_names if adapter_names is not None else [self.active_adapter]:
            config = self.peft_config.get(name)
            if config is not None and not registry.method_type(config.peft_type).mergeable:
                raise ValueError(registry.method_type(config.peft_type).merge_error)

    def unmerge_adapter(self) -> None:
        """Undo `merge_adapter`; idempotent."""
        for _, layer in self._delta_layers():
            layer.unmerge()

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the model computes exactly what the base model computes."""
        if registry.method_type(self.peft_config[self.active_adapter].peft_type).in_place:
            raise ValueError(
                f"{self.peft_config[self.active_adapter].peft_type} fine-tuning changes the base weights themselves; "
                "there is no separate base to fall back to"
            )
        layers = self._delta_layers()
        merged = {name: list(layer.merged_adapters) for name, layer in layers}
        for _, layer in layers:
            layer.unmerge()
            layer.disabled = True
        try:
            yield
        finally:
            for name, layer in layers:
                layer.disabled = False
                if merged[name]:
                    layer.merge(merged[name])

    def merge_and_unload(
        self, adapter_names: list[str] | None = None, dtype: torch.dtype | None = None
    ) -> nn.Module:
        """Merge the active adapter (or `adapter_names`) into the base and return the plain model, with no trace
        of deltatune.

        Args:
            adapter_names: adapters to merge (default: the active one).
            dtype: the float dtype of the returned model. Needed for a quantized base, which is dequantized and
                merged in fp32, then rounded to `dtype` (default fp32); also casts a float base.

        Raises:
            ValueError: the method can't be merged (bottleneck adapters, prompt tuning, ...); says why.
        """
        self._check_mergeable(adapter_names)
        n_quantized = sum(1 for m in self.base_model.modules() if getattr(m, "is_quantized_linear", False))
        if n_quantized:
            dtype = dtype or torch.float32
            logger.warning(
                "dequantizing %d quantized layers to %s: their weights keep the quantization rounding",
                n_quantized,
                dtype,
            )
        layers = self._delta_layers()
        self._untie_merged_weights(layers)
        # Merge everything first, so a layer that can't merge (a bottleneck adapter) raises before any swap.
        replacements = {}
        for name, layer in layers:
            names = adapter_names if adapter_names is not None else layer.active_adapters
            if isinstance(layer, mts.ModulesToSave):
                replacements[name] = layer.active_module()
            elif getattr(layer.base_layer, "is_quantized_linear", False):
                weight = layer.merged_weight(names)
                replacements[name] = dequantized_linear(layer.base_layer, dtype or torch.float32, weight)
            else:
                layer.merge(names)
                replacements[name] = layer.base_layer
        for name, replacement in replacements.items():
            inject.replace_module(self.base_model, name, replacement)
        return self._finish_unwrap(dtype)

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the plain base model."""
        self.unmerge_adapter()
        for name, layer in self._delta_layers():
            replacement = layer.original_module if isinstance(layer, mts.ModulesToSave) else layer.base_layer
            inject.replace_module(self.base_model, name, replacement)
        return self._finish_unwrap(None)

    def _finish_unwrap(self, dtype: torch.dtype | None) -> nn.Module:
        model = self.base_model
        quantized = [n for n, m in model.named_modules() if getattr(m, "is_quantized_linear", False)]
        if dtype is not None:
            for name in quantized:
                inject.replace_module(model, name, dequantized_linear(inject.get_module(model, name), dtype))
            model.to(dtype)
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    # ---- parameters --------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, counted as PEFT counts them."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        # A quantized weight is a buffer; PEFT counts it by its original number of elements.
        total += sum(
            m.in_features * m.out_features for m in self.modules() if getattr(m, "is_quantized_linear", False)
        )
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print PEFT's line: `trainable params: X || all params: Y || trainable%: Z`."""
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    # ---- saving and loading -------------------------------------------------------------------------
    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """The tensors of one adapter under PEFT's keys (`base_model.model.<path>...`)."""
        adapter_name = adapter_name or self.active_adapter
        method = registry.module_for(self.peft_config[adapter_name].peft_type)
        prefix = registry.method_type(self.peft_config[adapter_name].peft_type).key_prefix
        params = dict(self.base_model.named_parameters())
        out = {}
        for name in self._adapter_param_names(adapter_name):
            key = method.saved_key(name, adapter_name)
            if (
                key is not None
            ):  # None: saved whole by `shared_tensors` (prompt learning's `prompt_embeddings`)
                out[prefix + mts.saved_key(key, adapter_name)] = params[name]
        shared = getattr(method, "shared_tensors", None)  # tensors of the whole adapter (VeRA's projections)
        if shared is not None:
            out.update(shared(self.base_model, self.peft_config[adapter_name], adapter_name))
        return out

    def save_pretrained(
        self, save_directory: str | os.PathLike, selected_adapters: list[str] | None = None, **_: object
    ) -> None:
        """Write each adapter as PEFT does: the default one in `save_directory`, others in sub-folders.

        Each file is written to a temp file and renamed, so a crash mid-save leaves the old adapter intact.
        """
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise checkpoint.CheckpointError(
                f"{save_directory!r} is a file; save_pretrained needs a directory"
            )
        for name in selected_adapters or self.adapter_names:
            if name not in self.peft_config:
                raise ValueError(f"no adapter named {name!r}; loaded adapters: {self.adapter_names}")
            directory = save_directory if name == DEFAULT_ADAPTER else os.path.join(save_directory, name)
            config = self.peft_config[name].to_dict()
            config["inference_mode"] = True
            checkpoint.save_adapter(directory, self.adapter_state_dict(name), config)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = DEFAULT_ADAPTER,
        is_trainable: bool = False,
        config: AnyConfig | None = None,
        tensors: dict[str, torch.Tensor] | None = None,
        **_: object,
    ) -> PeftModel:
        """Load an adapter directory (saved here or by PEFT) onto `model`.

        `tensors`: its weights, read already by `read_adapter_tensors` (a server reads them in another thread);
        default: read here.

        Raises:
            CheckpointError: the files are missing or corrupt, or their shapes don't fit `model` (every mismatch
                is named, and `model` is left as it was).
        """
        directory = os.fspath(model_id)
        _check_adapter_name(adapter_name)
        config = copy.deepcopy(config) if config is not None else load_config(directory)
        config.inference_mode = not is_trainable
        tensors = _read_adapter(directory, config) if tensors is None else tensors
        with _fits(directory):
            peft = cls(model, config, adapter_name)
        try:
            peft._load_tensors(adapter_name, tensors, directory)
        except Exception:
            peft.unload()
            raise
        peft.set_adapter(adapter_name)
        if not is_trainable:
            peft.eval()
        return peft

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        tensors: dict[str, torch.Tensor] | None = None,
        config: AnyConfig | None = None,
        **_: object,
    ) -> None:
        """Load another adapter directory under `adapter_name` (the active adapter doesn't change); `config` (its
        config, read already: a server registered it) and `tensors` as in `from_pretrained`."""
        directory = os.fspath(model_id)
        _check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} exists already; pick another name")
        config = copy.deepcopy(config) if config is not None else load_config(directory)
        config.inference_mode = not is_trainable
        tensors = _read_adapter(directory, config) if tensors is None else tensors
        with _fits(directory):
            self.add_adapter(adapter_name, config)
        try:
            self._load_tensors(adapter_name, tensors, directory)
        except Exception:
            self._remove_from_layers(adapter_name)
            del self.peft_config[adapter_name]
            raise

    def _load_tensors(self, adapter_name: str, tensors: dict[str, torch.Tensor], where: str) -> None:
        method = registry.module_for(self.peft_config[adapter_name].peft_type)
        prefix = registry.method_type(self.peft_config[adapter_name].peft_type).key_prefix
        wrappers = [n for n, m in self._delta_layers() if isinstance(m, mts.ModulesToSave)]
        found = {}
        load_shared = getattr(method, "load_shared", None)
        if (
            load_shared is not None
        ):  # keys outside the model's own (VeRA's `base_model.vera_A`, `prompt_embeddings`)
            shared = {k: t for k, t in tensors.items() if not k.startswith(prefix)}
            load_shared(self.base_model, self.peft_config[adapter_name], adapter_name, shared, where)
            tensors = {k: t for k, t in tensors.items() if k not in shared}
        for key, tensor in tensors.items():
            key = key.removeprefix(prefix)
            for w in wrappers:
                if (
                    key.startswith(f"{w}.")
                    and not key.startswith(f"{w}.modules_to_save.")
                    and not key.startswith(f"{w}.original_module.")
                ):
                    key = f"{w}.modules_to_save.{adapter_name}.{key[len(w) + 1 :]}"
                    break
            found[method.internal_key(key, adapter_name)] = tensor
        saved = [
            n
            for n in self._adapter_param_names(adapter_name)
            if method.saved_key(n, adapter_name) is not None
        ]
        # The adapter's own parameters, looked up by name; the whole model's, when the file holds others.
        params = _parameters_at(self.base_model, saved) if found.keys() <= set(saved) else None
        if params is None:
            params = dict(self.base_model.named_parameters())
        expected = {n: params[n].shape for n in saved}
        # Tensors a PEFT checkpoint may add (a targeted embedding's base weight, say) load into the base.
        extra = {k: params[k].shape for k in found if k not in expected and k in params}
        checkpoint.check_shapes({**expected, **extra}, found, where)
        wrong = [k for k, t in found.items() if params[k].is_floating_point() and not t.is_floating_point()]
        if wrong:
            raise checkpoint.CheckpointError(
                f"the adapter in {where} holds integer tensors where weights are expected ({', '.join(wrong[:5])}"
                f"{', ...' if len(wrong) > 5 else ''}): the file is damaged or not an adapter"
            )
        with torch.no_grad():
            for key, tensor in found.items():
                params[key].copy_(tensor.to(params[key].dtype))
        method.after_load(self.base_model, adapter_name)


def _parameters_at(model: nn.Module, names: list[str]) -> dict[str, nn.Parameter] | None:
    """The parameters `model.named_parameters()` names `names`, found by their paths (`get_parameter`, without
    walking the model); None when a name is not a parameter's path."""
    try:
        return {name: model.get_parameter(name) for name in names}
    except AttributeError:
        return None


def dequantized_linear(
    module: nn.Module, dtype: torch.dtype, weight: torch.Tensor | None = None
) -> nn.Linear:
    """A plain `nn.Linear` in `dtype` from a frozen quantized linear (or from `weight`, `[out, in]`)."""
    weight = module.dequantize() if weight is None else weight
    bias = getattr(module, "bias", None)
    linear = nn.Linear(
        weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=dtype
    )
    with torch.no_grad():
        linear.weight.copy_(weight.to(dtype))
        if bias is not None:
            linear.bias.copy_(bias.to(dtype))
    return linear


@contextlib.contextmanager
def _fits(directory: str) -> Iterator[None]:
    """A saved adapter whose targets match no module of the model (another architecture's) is a checkpoint that
    doesn't fit, said as one, not a bare ValueError from target matching."""
    try:
        yield
    except inject.NoTargetsError as e:
        raise CheckpointError(
            f"the adapter in {directory} does not fit this model (was it trained on another architecture?): {e}"
        ) from None


class _MissingAttribute(AttributeError):
    """Neither the `PeftModel` nor its base model has the attribute: says so for both and suggests the closest
    name (or names the property of either that failed inside). The message is made only when shown, so `hasattr()`
    (which transformers calls often) stays cheap."""

    def __init__(self, model: PeftModel, name: str):
        super().__init__(name)
        self.name = name  # set, so Python doesn't add a "Did you mean" of its own from the base model
        self._model = model

    def __reduce__(self):
        # copied or pickled (a worker process sends its error back pickled) as a plain AttributeError with the
        # message: never the model it holds, and no call of this constructor, which takes the model
        return AttributeError, (str(self),), {"name": self.name}

    def __str__(self) -> str:
        import difflib

        base = self._model.__dict__.get("_modules", {}).get("base_model")  # none while a copy is being built
        for owner in (type(self._model), type(base) if base is not None else None):
            if owner is not None and self.name in dir(owner):  # there, so a property that failed inside
                return (
                    f"{owner.__name__}.{self.name} raised an AttributeError while it was read: an attribute its "
                    f"own code reads is missing (Python then looks {self.name!r} up as a missing attribute, "
                    "which hides that first error)"
                )
        known = set(dir(type(self._model))) | set(vars(self._model)) | set(dir(base))
        known = {n for n in known if not n.startswith("_")}
        close = difflib.get_close_matches(self.name, sorted(known), n=1, cutoff=0.7)
        return (
            f"'PeftModel' object has no attribute {self.name!r}, nor has its base model "
            f"({type(base).__name__})" + (f"; did you mean {close[0]!r}?" if close else "")
        )


ADAPTER_NAME_RULE = (
    "an adapter name is a non-empty string without '.', '/', '\\' or '..', other than "
    f"'{BASE}', and not an attribute name of torch.nn.Module (such as 'train', 'to', 'half', 'forward', "
    "'training' or '_modules'), since adapters are kept in torch.nn.ModuleDicts under their names"
)


@functools.cache
def _reserved_names() -> frozenset[str]:
    """Names a `nn.ModuleDict`/`nn.ParameterDict` key can't take: the attributes of those containers."""
    return frozenset(dir(nn.ModuleDict())) | frozenset(dir(nn.ParameterDict()))


def check_adapter_name(name: object) -> None:
    """Raise a `ValueError` stating `ADAPTER_NAME_RULE` when `name` can't be an adapter's name."""
    if (
        not isinstance(name, str)
        or not name
        or name == BASE
        or "/" in name
        or "\\" in name
        or "." in name
        or "\x00" in name
        or name in _reserved_names()
    ):
        raise ValueError(f"invalid adapter name {short(name, 100)}: {ADAPTER_NAME_RULE}")


_check_adapter_name = check_adapter_name


def read_adapter_tensors(
    directory: str | os.PathLike, config: AnyConfig | None = None
) -> dict[str, torch.Tensor]:
    """An adapter directory's weights as `from_pretrained(..., tensors=)` takes them: its safetensors file read
    after its header was checked against `config` (default: the directory's own). Touches no model, so it can run
    in a thread beside one that is computing."""
    directory = os.fspath(directory)
    return _read_adapter(directory, load_config(directory) if config is None else config)


def _read_adapter(directory: str, config: AnyConfig) -> dict[str, torch.Tensor]:
    """The tensors of an adapter directory, after its config was checked against the file's header (so a
    config that would build absurdly large layers is refused before anything is allocated)."""
    weights_file = checkpoint.adapter_weights_file(directory)
    check = getattr(registry.module_for(config.peft_type), "check_file_shapes", None)
    if check is not None:
        check(config, checkpoint.tensor_shapes(weights_file), directory)
    tensors = checkpoint.load_tensors(weights_file)
    check_finite(tensors, weights_file)
    return tensors


def check_finite(tensors: dict[str, torch.Tensor], weights_file: str) -> None:
    """Refuse an adapter whose weights hold NaN or inf: it can only give NaN outputs, and whether they show
    depends on what it runs beside (torch's CPU attention turns a NaN query into finite output when no mask is
    passed), so a broken file is named when it is read, not guessed at from its outputs."""
    bad = [
        name
        for name, t in tensors.items()
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all())
    ]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise NonFiniteWeightsError(
            f"{os.path.basename(weights_file)} holds NaN or inf values in {bad[0]}{more}: the adapter is broken "
            "(its training diverged, or the file was altered); retrain it or use an earlier checkpoint"
        )


def _is_auto_heads(config: AnyConfig) -> bool:
    heads = TASK_HEADS.get(config.task_type or "")
    return (
        heads is not None and config.modules_to_save is not None and set(heads) <= set(config.modules_to_save)
    )


def _with_task_defaults(config: AnyConfig, model: nn.Module) -> None:
    """The task head trains and is saved (PEFT adds `classifier`/`score`, or `qa_outputs`). With no task_type, a
    `...ForSequenceClassification` (token classification, question answering) model implies one: its fresh head
    must not stay frozen. Changes `config` (a copy) in place."""
    if config.task_type is None:
        inferred = task_type_of(model)
        if inferred is not None:
            config.task_type = inferred
            key = (type(model).__name__, inferred)
            if key not in _TASK_LOGGED:
                _TASK_LOGGED.add(key)
                logger.warning(
                    "task_type not set: %s is a %s model, so task_type=%r; its head (%s) trains and is saved",
                    type(model).__name__,
                    inferred,
                    inferred,
                    "/".join(TASK_HEADS[inferred]),
                )
    heads = TASK_HEADS.get(config.task_type or "")
    if heads and registry.method_type(config.peft_type).adds_task_heads:
        extra = [h for h in heads if h not in (config.modules_to_save or [])]
        config.modules_to_save = [*(config.modules_to_save or []), *extra]


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    for key in ("input_ids", "inputs_embeds", "x"):
        value = kwargs.get(key)
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    for value in args:
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    return None
