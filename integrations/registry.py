"""Registry of adapters: which patch / unpatch functions serve which model types.

    from blossom_ops.integrations.registry import patch, ADAPTERS
    patch(model, window=8)        # picks the adapter whose model types match the model

Each entry names the adapter module, its patch and unpatch functions and the model types it
targets (dotted class names, resolved lazily: transformers and RecBole are optional and are
imported only when a model of theirs is patched).
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

__all__ = ["Adapter", "ADAPTERS", "adapter_for", "patch", "unpatch"]


@dataclasses.dataclass(frozen=True)
class Adapter:
    name: str           # module under blossom_ops.integrations
    patch: str          # function names in that module
    unpatch: str
    model_types: tuple  # dotted class names this adapter patches (instances of, or containing)

    def functions(self) -> tuple[Callable, Callable]:
        mod = importlib.import_module(f"{__package__}.{self.name}")
        return getattr(mod, self.patch), getattr(mod, self.unpatch)


ADAPTERS = (
    Adapter("torch_mha", "patch_torch_mha", "unpatch_torch_mha",
            ("torch.nn.MultiheadAttention", "torch.nn.TransformerEncoderLayer",
             "torch.nn.TransformerEncoder")),
    Adapter("hf", "patch_hf", "unpatch_hf",
            ("transformers.PreTrainedModel",)),
    Adapter("recbole", "patch_recbole", "unpatch_recbole",
            ("recbole.model.layers.MultiHeadAttention",
             "recbole.model.layers.TransformerEncoder",
             "recbole.model.abstract_recommender.SequentialRecommender")),
)


def _class_names(obj) -> set:
    cls = obj if isinstance(obj, type) else type(obj)
    return {f"{c.__module__}.{c.__qualname__}" for c in cls.__mro__}


def _matches(adapter: Adapter, obj) -> bool:
    names = _class_names(obj)
    # transformers and recbole re-export classes; compare on the defining module's path too
    short = {n.split(".")[0] + "." + n.rsplit(".", 1)[-1] for n in names}
    for t in adapter.model_types:
        if t in names or (t.split(".")[0] + "." + t.rsplit(".", 1)[-1]) in short:
            return True
    return False


def adapter_for(model) -> Adapter:
    """The adapter for a model instance or class. A model that is none of the registered
    types but contains torch MultiheadAttention modules gets the torch adapter."""
    for adapter in ADAPTERS:
        if _matches(adapter, model):
            return adapter
    if not isinstance(model, type):
        for sub in model.modules():
            for adapter in ADAPTERS:
                if _matches(adapter, sub):
                    return adapter
    raise TypeError(f"no BlossomRec adapter for {type(model).__name__}; registered: "
                    + ", ".join(a.name for a in ADAPTERS))


def patch(model, **config):
    """Patch ``model`` (instance or class) with the adapter that serves it."""
    return adapter_for(model).functions()[0](model, **config)


def unpatch(model):
    return adapter_for(model).functions()[1](model)
