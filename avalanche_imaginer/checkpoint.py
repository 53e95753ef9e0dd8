"""Make strategies checkpointable with Avalanche's ``save_checkpoint``.

Avalanche pickles the whole strategy with dill. With dill 0.4 and recent torch,
no strategy holding a built-in torch optimizer can be saved: torch removes
the names of its optimizer submodules from ``torch.optim`` (``del sgd`` in its
``__init__``), so dill cannot find ``torch.optim.sgd.SGD`` by reference, falls
back to pickling the class by value, and fails on a ``typing_extensions``
sentinel inside it ("Can't pickle sentinel").

The work-around lives here, in one place: a dill reducer for every optimizer
class that ``torch.optim`` exports, which saves the class by its import path
and the optimizer's own ``__getstate__`` (defaults, state, parameter groups).
Parameters are the same objects as the model's in the pickle, so a loaded
optimizer still steps the loaded model. It is registered when the package is
imported; it changes how dill pickles torch optimizers and nothing else.
"""

from __future__ import annotations

import importlib

import dill
import torch

__all__ = ["register_optimizer_pickling"]


def _new_optimizer(module: str, qualname: str) -> torch.optim.Optimizer:
    """An empty instance of the optimizer class at ``module.qualname``."""
    cls = getattr(importlib.import_module(module), qualname)
    return cls.__new__(cls)


def _save_optimizer(pickler, obj: torch.optim.Optimizer) -> None:
    cls = type(obj)
    pickler.save_reduce(
        _new_optimizer,
        (cls.__module__, cls.__qualname__),
        state=obj.__getstate__(),
        obj=obj,
    )


def register_optimizer_pickling() -> None:
    """Register the reducer for each optimizer class of ``torch.optim``."""
    for name in dir(torch.optim):
        cls = getattr(torch.optim, name)
        if (
            isinstance(cls, type)
            and issubclass(cls, torch.optim.Optimizer)
            and cls is not torch.optim.Optimizer
        ):
            dill.register(cls)(_save_optimizer)
