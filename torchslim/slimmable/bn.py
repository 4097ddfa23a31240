"""BatchNorm at a width: statistics recomputed for the width chosen (US-Nets' post-training
calibration), on the shared BatchNorm or on that width's private one (S-Nets' switchable BN)."""
from __future__ import annotations

from typing import Iterable

import torch

from torchslim.recovery import recalibrate_bn_
from torchslim.slimmable.slimmable import Slimmable, Width, width_key


def calibrate_bn(slim: Slimmable, batches: Iterable, width: Width, num_batches: int | None = None) -> int:
    """Re-estimate the BatchNorm statistics used at ``width`` as the plain average over
    ``batches`` (inputs, or ``(input, target)`` pairs), the rest of the model in eval mode.

    Shared BatchNorm: the statistics of the kept channels are rewritten in place (those of
    other widths are not kept: calibrate for the width you deploy, then export it). Switchable
    BatchNorm: that width's private statistics. Returns the number of batches used; with none,
    ``ValueError`` (statistics unchanged)."""
    with slim.at_width(width):
        if slim.config.switchable_bn:
            return _calibrate_private(slim, batches, width, num_batches)
        return recalibrate_bn_(slim.model, batches, num_batches)


def _calibrate_private(slim: Slimmable, batches: Iterable, width: Width, num_batches: int | None) -> int:
    per_width = slim.switchable[width_key(width)]
    assert isinstance(per_width, torch.nn.ModuleDict)
    stats = [_stats(h) for h in per_width.values() if getattr(h, "running_mean", None) is not None]
    saved = [[t.clone() for t in group] for group in stats]
    with torch.no_grad():
        for mean, var, tracked in stats:
            mean.zero_(), var.fill_(1.0), tracked.zero_()
    try:
        return recalibrate_bn_(slim.model, batches, num_batches)
    except BaseException:
        with torch.no_grad():
            for group, old in zip(stats, saved):
                for tensor, value in zip(group, old):
                    tensor.copy_(value)
        raise


def _stats(holder: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    buffers = dict(holder.named_buffers())
    return buffers["running_mean"], buffers["running_var"], buffers["num_batches_tracked"]
