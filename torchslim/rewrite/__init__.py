"""Structural rewrites of trained layers into cheaper equivalent-shaped blocks.

``rewrite_(model, example_inputs, RewriteConfig(to=..., target_macs=0.5))`` replaces chosen
layers by low-rank, depthwise-separable, grouped (its channel permutations folded into the
neighbouring layers where the dependency graph allows, else kept as channel shuffles) or
dilated blocks initialised from the trained weights by a stated optimal or least-squares fit,
reporting each fit's relative error; ``collapse_`` fuses adjacent linear maps back where that saves MACs. The
blocks are allow-listed replacement types, so ``torchslim.save``/``torchslim.load`` replay the
rewrites on a freshly built original without pickle, and the dependency graph prunes them.
"""
from torchslim.rewrite.api import RewriteConfig, RewriteResult, model_macs, plan_rewrite, rewrite_
from torchslim.rewrite.collapse import collapse_
from torchslim.rewrite.dilated import fit_dilated
from torchslim.rewrite.fold import Folding, SideFold, fold_shuffles_
from torchslim.rewrite.grouped import ChannelShuffle, GroupedConv2d, fit_grouped
from torchslim.rewrite.lowrank import LowRankConv2d, LowRankLinear, fit_lowrank
from torchslim.rewrite.plan import LayerPlan, RewritePlan
from torchslim.rewrite.separable import SeparableConv2d, fit_separable

__all__ = ["ChannelShuffle", "Folding", "GroupedConv2d", "LayerPlan", "LowRankConv2d", "LowRankLinear", "RewriteConfig",
           "RewritePlan", "RewriteResult", "SeparableConv2d", "SideFold", "collapse_", "fit_dilated", "fit_grouped",
           "fit_lowrank", "fit_separable", "fold_shuffles_", "model_macs", "plan_rewrite", "rewrite_"]
