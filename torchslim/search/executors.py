"""Where a search's evaluations run: in this process (the default), or in parallel on Ray.

A search's cost is its evaluations, and the candidates a method proposes together (the
sensitivity probes, the per-group proposals of one NetAdapt iteration) are independent. An
executor scores such a batch and hands the scores back in proposal order, so the history is
the same as the sequential run's for the same seed, whatever finishes first.

* :class:`InProcess` applies each candidate to the search's working copy and rolls it back
  (``torchslim.pruning.applied``): no copy per candidate, no extra install.
* :class:`RayExecutor` ships the working model to the Ray object store once per search and
  each candidate as a :class:`~torchslim.pruning.RemovalPlan` (plain data: kept indices, new
  shapes and attributes) to a Ray task, which applies it to its own copy of the model and runs
  the user's ``finetune`` / BatchNorm recalibration / ``evaluate`` there (Moritz et al., "Ray:
  A Distributed Framework for Emerging AI Applications", OSDI 2018). Local by default
  (``workers`` processes on this machine); ``address="ray://host:10001"`` (or ``"auto"``)
  joins a running cluster. The evaluator and fine-tune functions travel by cloudpickle, so
  they must be importable or self-contained on the workers.
"""
from __future__ import annotations

import abc
import copy
import dataclasses
import os
import sys
import time
from typing import TYPE_CHECKING, Any, Iterator

from torch import nn

from torchslim.modes import training_mode
from torchslim.pruning import RemovalPlan, Transaction, applied, apply_plan

if TYPE_CHECKING:
    from torchslim.search.base import Search


@dataclasses.dataclass(frozen=True)
class Scored:
    """One candidate's raw score (whatever ``evaluate`` returned, as float) and its seconds."""

    score: float
    seconds: float


class Executor(abc.ABC):
    """Scores a batch of candidate removals of ``search``'s working model, yielding in order.

    An evaluation that raises stops the iteration at its position with that exception (the
    scores yielded before it are recorded by the search)."""

    @abc.abstractmethod
    def scores(self, search: "Search", removals: list[RemovalPlan]) -> Iterator[Scored]:
        """Yield one :class:`Scored` per removal, in the order given."""

    def close(self) -> None:  # noqa: B027 - optional hook: an in-process executor holds nothing
        """Release what the executor holds (workers, object-store entries)."""

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class InProcess(Executor):
    """Sequential, in this process: each candidate applied to the working copy and rolled back."""

    def scores(self, search: "Search", removals: list[RemovalPlan]) -> Iterator[Scored]:
        for removal in removals:
            start = time.perf_counter()
            with applied(search.space.graph, removal):
                if search.finetune is None and not search.recalibrate_bn:
                    score = score_candidate(search.working, search.evaluate, None, None, None)
                    yield Scored(score, time.perf_counter() - start)
                    continue
                candidate = copy.deepcopy(search.working)  # fine-tuned or recalibrated: on a copy
            score = score_candidate(candidate, search.evaluate, search.finetune, search.finetune_budget,
                                    search.data if search.recalibrate_bn else None)
            yield Scored(score, time.perf_counter() - start)


def score_candidate(model: nn.Module, evaluate: Any, finetune: Any, finetune_budget: Any,
                    recalibration_data: Any) -> float:
    """Fine-tune (if given), recalibrate BatchNorm (if data), then evaluate in eval mode."""
    if finetune is not None:
        finetune(model, finetune_budget)
    if recalibration_data is not None:
        from torchslim.recovery import recalibrate_bn_

        recalibrate_bn_(model, recalibration_data)
    with training_mode(model, False):
        return float(evaluate(model))


def _score_on_worker(model: nn.Module, removal: RemovalPlan, evaluate: Any, finetune: Any, finetune_budget: Any,
                     recalibration_data: Any) -> Scored:
    """A Ray task: ``model`` is the task's own deserialized copy, pruned in place."""
    start = time.perf_counter()
    apply_plan(model, removal, Transaction())  # never rolled back: the copy is dropped after
    score = score_candidate(model, evaluate, finetune, finetune_budget, recalibration_data)
    return Scored(score, time.perf_counter() - start)


class RayExecutor(Executor):
    """Evaluate batches as Ray tasks, one CPU each: ``workers`` local processes, or a cluster
    at ``address``. ``pip install 'torchslim[ray]'``."""

    def __init__(self, workers: int = 2, address: str | None = None, *, threads_per_worker: int = 1):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers, self.address, self.threads_per_worker = workers, address, threads_per_worker
        self._model_ref: Any = None
        self._stored: nn.Module | None = None  # the working model in the store (compared by identity)
        self._task: Any = None  # the Ray remote function, made once
        self._started_ray = False

    def _ray(self) -> Any:
        try:
            import ray
        except ImportError:
            raise ImportError("RayExecutor needs Ray: pip install 'torchslim[ray]'") from None
        if not ray.is_initialized():
            if self.address is None:  # local workers import what this process can: the same sys.path
                ray.init(num_cpus=self.workers, include_dashboard=False, log_to_driver=False, configure_logging=False,
                         runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}})
            else:
                ray.init(address=self.address, log_to_driver=False, configure_logging=False)
            self._started_ray = True
        return ray

    def scores(self, search: "Search", removals: list[RemovalPlan]) -> Iterator[Scored]:
        ray = self._ray()
        if self._stored is not search.working:  # the working model never changes during a search: stored once
            self._model_ref, self._stored = ray.put(search.working), search.working
        if self._task is None:
            self._task = ray.remote(num_cpus=self.threads_per_worker)(_score_on_worker)
        task = self._task
        data = search.data if search.recalibrate_bn else None
        pending = [task.remote(self._model_ref, _portable(removal), search.evaluate, search.finetune,
                               search.finetune_budget, data) for removal in removals]
        for ref in pending:  # tasks after a failure run to their end and are dropped (no ray.cancel: it
            try:             # interrupts workers with a signal and has taken the driver down with them)
                yield ray.get(ref)
            except ray.exceptions.RayTaskError as exc:  # the user's exception, raised where it happened
                raise exc.as_instanceof_cause() from None

    def close(self) -> None:
        self._model_ref = self._stored = self._task = None
        if self._started_ray:
            import ray

            ray.shutdown()
            self._started_ray = False


def _portable(removal: RemovalPlan) -> RemovalPlan:
    """The removal without its traced-op references (only used to blame ops, and not picklable
    everywhere): what a worker needs to slice its copy."""
    return dataclasses.replace(removal, unresolved=[])
