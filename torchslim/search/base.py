"""The search loop every method shares: propose per-group ratios, meet the budget, prune on
the side, (fine-tune), evaluate, record.

A method (:class:`~torchslim.search.sensitivity.SensitivitySearch`,
:class:`~torchslim.search.annealing.AnnealingSearch`, ...) subclasses :class:`Search` and
implements :meth:`Search.explore`, calling :meth:`Search.evaluate_ratios` for each candidate.
The loop owns everything else:

* one working copy of the model is traced once; a candidate is applied to it in place and
  rolled back bit for bit (``torchslim.pruning.applied``), so no copy is made per candidate
  unless it is fine-tuned or its BatchNorm statistics are recalibrated (that happens on a copy);
  the user's model is never touched until :meth:`SearchResult.apply_`;
* a candidate is scaled along its own proportions until it meets the budget
  (:meth:`SearchSpace.meet_budget`), so every candidate is compared at the same cost;
* every evaluation is appended to the history (:mod:`torchslim.search.history`) before the
  next starts; ``resume=path`` replays it, so the same seed gives the same result as a run
  never stopped;
* ``max_evals`` and ``time_limit`` stop the method; the best candidate meeting the budget
  so far is the result.

``evaluate(model) -> float`` (higher is better) is called on the pruned model in eval mode.
It must not train on the data it scores (the search would select for what it memorised);
``finetune(model, finetune_budget)`` is the place for training, on its own data.
"""
from __future__ import annotations

import abc
import copy
import dataclasses
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
from torch import nn

from torchslim.pruning import PruneConfig, PruneResult, plan_removal, prune_
from torchslim.search._space import Measures, Ratios, SearchSpace
from torchslim.search.executors import Executor, InProcess, Scored
from torchslim.search.history import History, Record

Evaluator = Callable[[nn.Module], float]
Finetuner = Callable[[nn.Module, Any], Any]


class SearchWarning(UserWarning):
    """A search went on past something worth knowing (a NaN score, a result pruned differently)."""


class SearchInterrupted(RuntimeError):
    """The evaluator (or fine-tune) raised: the search stopped, its records are kept.

    ``records`` holds them; ``path`` is the history file to pass as ``resume=`` (None when the
    search was run without ``history=``)."""

    def __init__(self, message: str, records: list[Record], path: Path | None):
        super().__init__(message)
        self.records, self.path = records, path


class _Exhausted(Exception):
    """``max_evals`` or ``time_limit`` reached: the method stops, the loop returns the best."""


@dataclasses.dataclass
class SearchResult:
    """The winner and how it was found: ``config`` is an ordinary ``PruneConfig`` (per-group
    ratios by group id, no target) that ``prune_`` applies as is; ``ratios`` the same ratios,
    ``score`` its evaluation, ``macs``/``params``/``latency_ms`` what it leaves, ``original``
    what the unpruned model has, ``history`` every evaluation, ``stopped`` why the search
    ended (``"done"``, ``"max_evals"``, ``"time_limit"``)."""

    method: str
    config: PruneConfig
    ratios: dict[int, float]
    score: float
    macs: int
    params: int
    latency_ms: float | None
    original: Measures
    history: list[Record]
    stopped: str = "done"
    path: Path | None = None
    data: Any = dataclasses.field(default=None, repr=False)
    loss_fn: Any = dataclasses.field(default=None, repr=False)

    def apply_(self, model: nn.Module, example_inputs: Any, **prune_kwargs: Any) -> PruneResult:
        """Prune ``model`` in place with :attr:`config` through ``prune_`` (ranked, removed,
        verified, all-or-nothing). Warns if a verification rollback made it prune less than
        the search evaluated."""
        prune_kwargs.setdefault("data", self.data)
        prune_kwargs.setdefault("loss_fn", self.loss_fn)
        result = prune_(model, example_inputs, self.config, **prune_kwargs)
        if result.macs_after != self.macs:
            warnings.warn(f"the pruned model has {result.macs_after} MACs, the search evaluated {self.macs}: "
                          f"{len(result.skipped)} removal(s) were rolled back ({'; '.join(result.skipped) or 'none'})",
                          SearchWarning, stacklevel=2)
        return result


class Search(abc.ABC):
    """Base of the search methods: holds the model, budget, evaluator and history; subclasses
    implement :meth:`explore`.

    ``target_macs`` / ``target_params`` / ``target_latency``: the budget, as in
    ``PruneConfig`` (a fraction of the original if <= 1, else absolute; latency is predicted
    by the per-layer table measured on this machine). ``config``: a ``PruneConfig`` giving the
    scope (``op_names``, ``exclude``...), ``round_to``, ``min_channels`` and ``exact_only``;
    its ``criterion`` (overridden by ``criterion=`` when given) orders channels inside a
    group. ``data``/``loss_fn``: for data-driven criteria, and with ``recalibrate_bn=True``
    the batches BatchNorm statistics are re-estimated on before each evaluation.
    ``history``: JSON-lines file the records are appended to; ``resume``: a history file to
    continue (records replayed, new ones appended there). ``executor``: where evaluations run
    (:mod:`torchslim.search.executors`); ``on_record(record)``: called after each new evaluation
    (progress bars). ``reference``: the model ``model`` was pruned from (same parameter names),
    when searching again on a pruned model: no group then loses more than
    ``TARGET_SEARCH_MAX_RATIO`` of its reference width in all (:meth:`SearchSpace.cap`).
    """

    method: ClassVar[str] = "search"
    default_max_evals: ClassVar[int | None] = None

    def __init__(self, model: nn.Module, example_inputs: Any, evaluate: Evaluator, *,
                 target_macs: float | None = None, target_params: float | None = None,
                 target_latency: float | None = None, finetune: Finetuner | None = None, finetune_budget: Any = None,
                 data: Any = None, loss_fn: Any = None, recalibrate_bn: bool = False, max_evals: int | None = None,
                 time_limit: float | None = None, seed: int = 0, criterion: Any = None,
                 config: PruneConfig | None = None, history: str | os.PathLike | None = None,
                 resume: str | os.PathLike | None = None, executor: Executor | None = None,
                 on_record: Callable[[Record], Any] | None = None, reference: nn.Module | None = None):
        if not callable(evaluate):
            raise TypeError(f"evaluate must be a callable model -> float, got {type(evaluate).__name__}")
        if finetune is not None and not callable(finetune):
            raise TypeError(f"finetune must be a callable (model, budget) -> None, got {type(finetune).__name__}")
        if recalibrate_bn and data is None:
            raise ValueError("recalibrate_bn=True needs data= (the batches BatchNorm statistics are estimated on)")
        if max_evals is not None and max_evals < 1:
            raise ValueError(f"max_evals must be >= 1 or None, got {max_evals}")
        if time_limit is not None and not time_limit > 0:
            raise ValueError(f"time_limit must be > 0 seconds or None, got {time_limit}")
        base = config or PruneConfig()
        fields: dict[str, Any] = {"target_macs": target_macs, "target_params": target_params,
                                  "target_latency": target_latency, "seed": seed}
        if criterion is not None:
            fields["criterion"] = criterion
        if base.target is not None and all(fields[f] is None for f in ("target_macs", "target_params",
                                                                       "target_latency")):
            fields.update({"target_macs": base.target_macs, "target_params": base.target_params,
                           "target_latency": base.target_latency})
        self.config = dataclasses.replace(base, **fields)
        self.evaluate, self.finetune, self.finetune_budget = evaluate, finetune, finetune_budget
        self.data, self.loss_fn, self.recalibrate_bn = data, loss_fn, recalibrate_bn
        self.max_evals = max_evals if max_evals is not None else self.default_max_evals
        self.time_limit, self.seed = time_limit, seed
        self.executor = executor if executor is not None else InProcess()
        self.on_record = on_record
        self.rng = np.random.default_rng(seed)
        self.working = copy.deepcopy(model)  # the user's model is not touched until apply_
        self.example_inputs = example_inputs
        self.space = SearchSpace(self.working, example_inputs, self.config, data=data, loss_fn=loss_fn,
                                 reference=reference)
        self._history_path, self._resume_path = history, resume
        self.history: History | None = None
        self._replayed = 0
        self._started = 0.0

    # what subclasses implement ------------------------------------------------------
    @abc.abstractmethod
    def explore(self) -> None:
        """Propose candidates, calling :meth:`evaluate_ratios` for each, until done."""

    def options(self) -> dict[str, Any]:
        """The method's own settings, written to the history header (a resume checks them)."""
        return {}

    def choose(self) -> Record | None:
        """The winning record: by default the best score among those meeting the budget."""
        assert self.history is not None
        fitting = [r for r in self.history.records if r.meets_budget and r.proposed is not None]
        return max(fitting, key=lambda r: r.score, default=None)  # max keeps the first of equal scores

    # the loop ------------------------------------------------------------------------
    def run(self) -> SearchResult:
        """Run the method to the end (or ``max_evals`` / ``time_limit``) and return the best."""
        self.space.check_reachable()  # before the first evaluation
        self.begin()
        stopped = "done"
        try:
            self.explore()
        except _Exhausted as exc:
            stopped = str(exc)
        return self.result(stopped)

    def begin(self) -> None:
        """Open the history (once per search object: a second run replays what the first
        recorded) and start the clock of ``time_limit``."""
        if self.history is None:
            self.history = self._open_history()
        self._replayed, self._started = 0, time.monotonic()

    def result(self, stopped: str) -> SearchResult:
        assert self.history is not None
        best = self.choose()
        if best is None:
            raise RuntimeError(f"{self.method}: no evaluated candidate meets the budget "
                               f"({len(self.history.records)} evaluations, stopped: {stopped}); raise max_evals")
        return self._result_for(best.ratios, best.score, stopped)

    def _result_for(self, ratios: Ratios, score: float, stopped: str) -> SearchResult:
        assert self.history is not None
        found = self.space.measure(ratios)
        return SearchResult(self.method, self.space.config_for(ratios), self.space.exact_ratios(ratios), score,
                            found.macs, found.params, found.latency_ms, self.space.original,
                            list(self.history.records), stopped, self.history.path, self.data, self.loss_fn)

    def header(self) -> dict[str, Any]:
        target = self.config.target
        criterion = self.config.criterion
        return {"method": self.method, "seed": self.seed,
                "target": None if target is None else {target.field: target.value},
                "criterion": criterion if isinstance(criterion, str) else type(criterion).__name__,
                "options": self.options(), "space": self.space.describe()}

    def _open_history(self) -> History:
        if self._resume_path is not None:
            if self._history_path is not None and Path(self._history_path) != Path(self._resume_path):
                raise ValueError("give history= or resume=, not both: a resumed search appends to the file it resumes")
            return History.resume(self._resume_path, self.header())
        return History(self.header(), self._history_path)

    @property
    def evaluations(self) -> int:
        """Evaluations so far, replayed ones included."""
        return self._replayed if self.history is None else max(self._replayed, len(self.history.records))

    def evaluate_ratios(self, ratios: Ratios, *, meet_budget: bool = True, note: str = "") -> Record:
        """Evaluate one candidate: ``ratios`` (group id -> share removed) scaled to meet the
        budget unless ``meet_budget=False`` (a probe, e.g. one group alone), pruned on the side,
        scored, recorded. A record of a resumed history is returned instead where it exists."""
        return self.evaluate_batch([ratios], meet_budget=meet_budget, notes=[note])[0]

    def evaluate_batch(self, proposals: Sequence[Ratios], *, meet_budget: bool = True,
                       notes: Sequence[str] | None = None) -> list[Record]:
        """Evaluate independent candidates together (in parallel under a parallel executor);
        recorded in proposal order, exactly as one :meth:`evaluate_ratios` call each would.
        Stops (``max_evals``) after the evaluations that fit, those recorded."""
        assert self.history is not None, "evaluate_batch runs inside run()"
        notes = list(notes) if notes is not None else [""] * len(proposals)
        fitted = [self._fit(ratios, meet_budget) for ratios in proposals]
        records = []
        while fitted and self._replayed < len(self.history.records):
            proposed, exact = fitted.pop(0)
            records.append(self._replay(exact))
            notes.pop(0)
        if not fitted:
            return records
        self._check_limits()
        room = len(fitted) if self.max_evals is None else self.max_evals - len(self.history.records)
        batch = fitted[:room]
        removals = [plan_removal(self.space.graph, self.space.removal(exact)) for _, exact in batch]
        scored = self.executor.scores(self, removals)
        for (proposed, exact), note in zip(batch, notes):
            try:
                outcome = next(scored)
            except Exception as exc:  # whatever the user's code raises stops the search, the records kept
                raise SearchInterrupted(self._interrupted_message(exc), list(self.history.records),
                                        self.history.path) from exc
            records.append(self._record(proposed if meet_budget else None, exact, outcome, note))
        if len(batch) < len(fitted):
            raise _Exhausted("max_evals")
        return records

    def _fit(self, ratios: Ratios, meet_budget: bool) -> tuple[dict[int, float], dict[int, float]]:
        """(the ratios as proposed, the exact ratios evaluated: scaled to the budget unless a probe)."""
        proposed = {int(k): float(v) for k, v in ratios.items()}
        fitted = self.space.meet_budget(proposed) if meet_budget else proposed
        return proposed, self.space.exact_ratios(fitted)

    def _record(self, proposed: dict[int, float] | None, exact: dict[int, float], outcome: Scored,
                note: str) -> Record:
        assert self.history is not None
        found = self.space.measure(exact)
        raw = outcome.score
        score = raw if math.isfinite(raw) else -math.inf
        if not math.isfinite(raw):
            warnings.warn(f"{self.method}: evaluate returned {raw} for evaluation {len(self.history.records)} "
                          f"({note or exact}); it counts as the worst score", SearchWarning, stacklevel=3)
        record = Record(len(self.history.records), exact, found.macs, found.params, score, outcome.seconds,
                        self.space.meets(found), found.latency_ms, proposed, note,
                        None if math.isfinite(raw) else repr(raw))
        self.history.append(record)
        self._replayed = len(self.history.records)
        if self.on_record is not None:
            self.on_record(record)
        return record

    def _replay(self, exact: dict[int, float]) -> Record:
        assert self.history is not None
        record = self.history.records[self._replayed]
        if self.space.keep_counts(record.ratios) != self.space.keep_counts(exact):
            raise ValueError(f"cannot resume: record {record.index} of {self.history.path} evaluated {record.ratios}, "
                             f"this search proposes {exact} there (a different evaluator, model or code)")
        self._replayed += 1
        return record

    def _check_limits(self) -> None:
        assert self.history is not None
        if self.max_evals is not None and len(self.history.records) >= self.max_evals:
            raise _Exhausted("max_evals")
        if self.time_limit is not None and time.monotonic() - self._started > self.time_limit:
            raise _Exhausted("time_limit")

    def _interrupted_message(self, exc: Exception) -> str:
        assert self.history is not None
        kept = len(self.history.records)
        where = (f"they are kept in {self.history.path}; run the same search with resume={str(self.history.path)!r} "
                 f"to continue from there" if self.history.path is not None else
                 "they are in this exception's .records; run with history=PATH to keep them in a file you can resume")
        return (f"{self.method} stopped: evaluation {kept} raised {type(exc).__name__}: {exc}. "
                f"{kept} evaluation(s) were recorded: {where}")
