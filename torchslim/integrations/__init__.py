"""Pruning inside the user's training stack, as optional extras.

* :mod:`torchslim.integrations.lightning`: ``AGPCallback``, a PyTorch Lightning callback
  (``pip install 'torchslim[lightning]'``);
* :mod:`torchslim.integrations.hf_trainer`: ``AGPTrainerCallback``, a Hugging Face
  ``transformers.TrainerCallback`` (``pip install 'torchslim[hf]'``).

Both drive :class:`torchslim.schedules.AGPPruner` by the trainer's optimizer steps (masks that
grow on AGP's cubic schedule and stay enforced through the optimizer), remove the masked
channels physically at a chosen step or at the end of training while slicing the optimizer's
state, and can write the result with :func:`torchslim.save`. Importing this package imports
neither framework; importing a callback module without its framework raises an ``ImportError``
that names the extra to install.
"""
from torchslim.integrations._agp import default_inputs_from_batch
from torchslim.integrations._distributed import sync_masks_

__all__ = ["default_inputs_from_batch", "sync_masks_"]
