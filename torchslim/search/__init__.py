"""Automatic searches that decide what to prune by measuring the model while they decide.

``torchslim.search.latency_loop`` closes the loop on latency for ``prune_``: a latency
target's goal is calibrated against measured removals, and under ``latency_aware`` the
candidate rankings are timed and the fastest kept (NetAdapt's lesson: measure every proposal).
The searches drive the engine only through its public API (``torchslim.pruning``: the
:class:`~torchslim.pruning.selector.Selector`, ``plan_removal`` and ``applied``).
"""
