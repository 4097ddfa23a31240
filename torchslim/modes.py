"""Training flags set for a while and put back exactly, module by module.

``model.train(flag)`` sets every submodule's ``training`` flag, so a model whose submodules
were deliberately mixed (a frozen BatchNorm in eval mode inside a training model, a teacher
kept in eval) would come back uniform after a plain ``model.eval() ... model.train()``. Every
place in torchslim that runs a model in a chosen mode (tracing, verification, criteria that
run data, analysis, latency, export, fine-tuning) goes through :func:`training_mode`.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn


@contextlib.contextmanager
def training_mode(model: nn.Module, mode: bool | None) -> Iterator[nn.Module]:
    """Run the block with ``model.train(mode)`` (``None``: flags left as they are) and restore
    every submodule's own ``training`` flag on exit, also when the block raises.

    Flags are saved for every module reachable from ``model`` (once per module object), so a
    module shared by two parents and one set differently from its parent both come back as
    they were.
    """
    saved = [(module, module.training) for module in model.modules()]
    try:
        if mode is not None:
            model.train(mode)
        yield model
    finally:
        for module, flag in saved:
            module.training = flag
