"""Slimmable networks on any model the engine covers: one set of weights that runs at several
widths (S-Nets, switchable BatchNorm), at any width in a range (US-Nets: sandwich rule, inplace
distillation, BatchNorm calibration), greedy width search under a budget (AutoSlim) and export of
a chosen width as an ordinary, physically smaller model.

    slim = make_slimmable(model, x, widths=(0.25, 0.5, 0.75, 1.0))
    with slim.at_width(0.5):
        y = slim(x)
    small = export_width(slim, 0.5, x)
"""
from torchslim.slimmable.autoslim import AutoSlimSearch, autoslim, positional_importance
from torchslim.slimmable.bn import calibrate_bn
from torchslim.slimmable.config import SlimmableConfig
from torchslim.slimmable.export import export_width
from torchslim.slimmable.io import load_slimmable, save_slimmable
from torchslim.slimmable.slimmable import Slimmable, make_slimmable
from torchslim.slimmable.train import sandwich_step, sandwich_widths, soft_target_loss, train_sandwich, width_key

__all__ = ["AutoSlimSearch", "Slimmable", "SlimmableConfig", "autoslim", "calibrate_bn", "export_width",
           "load_slimmable", "make_slimmable", "positional_importance", "sandwich_step", "sandwich_widths",
           "save_slimmable", "soft_target_loss", "train_sandwich", "width_key"]
