"""AutoCompress (Liu et al., "AutoCompress: An Automatic DNN Structured Pruning Framework for
Ultra-High Compression Rates", AAAI 2020): rounds of (search the per-group ratios, prune there
with ADMM training, remove), each round closer to the budget.

Round ``r`` of ``R`` aims at ``budget ** (r / R)`` of the original MACs (or parameters): the
budget reached in equal multiplicative steps, as the paper's incremental rounds and NNI's
AutoCompressPruner (``1 - (1 - sparsity) ** (1 / R)`` per round). In each round:

1. **Action sampling and quick evaluation** (the paper's steps 1-3): simulated annealing over
   per-group ratios on the current model (:class:`~torchslim.search.annealing.AnnealingSearch`,
   every candidate scaled to the round's budget, pruned one-shot on the side, BatchNorm
   recalibrated with ``recalibrate_bn=True``, optionally given a short ``finetune``, then scored);
   one history file per round. The user's model is the search's ``reference``: no group loses
   more than 95% of its original width over all rounds (a per-round cap on the current width
   compounds: two rounds once left ResNet-18's last stage 10 of 512 channels).
2. **Actual pruning** (step 4): :class:`~torchslim.search.admm.ADMMPruner` with the round's
   winning per-group ratios; ``admm_train(model, admm)`` is the user's training loop with
   ``admm.penalty()`` added to the loss and ``admm.step()`` after each optimizer step
   (:func:`admm_trainer` builds one from batches). ADMM chooses *which* channels go by the
   energy of ``W + U`` (the paper's Euclidean projection), as many per group as annealing chose.
3. **Hard prune**: the channels the last Z zeroes (the support training was pulled toward) are
   removed through the engine (verified, recorded in the model's pruning history), and the
   round's model is saved (``torchslim.save``) so that a resumed run starts from it.

After the last round ``final_finetune(model, finetune_budget)`` (optional) recovers accuracy,
as the paper's retraining. The user's model is never modified: the result carries the
compressed model (its pruning history records every removal, so ``torchslim.save`` /
``torchslim.load`` round-trip it from the original architecture).

Where this departs from the paper: the paper's "purification" step (removing redundant
filters and channels left after ADMM) is what the engine's dependency groups already do (a
channel removed in one tensor goes in every coupled tensor). Only MACs and parameter budgets:
a latency budget changes meaning once the weights are retrained between rounds (use
:class:`~torchslim.search.netadapt.NetAdaptSearch`).
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from torchslim.graph import DependencyGraph
from torchslim.graph.macs import estimate_macs
from torchslim.pruning import PruneConfig
from torchslim.pruning.plan import PruningPlan, pruning_history
from torchslim.search.admm import ADMMPruner, check_admm_schedule
from torchslim.search.annealing import AnnealingSearch
from torchslim.search.base import Evaluator, Finetuner, SearchResult, SearchWarning
from torchslim.search.executors import Executor
from torchslim.search.history import Record

AdmmTrain = Callable[[nn.Module, ADMMPruner], Any]
ROUND_FILE = "round.json"
ANNEALING_OPTIONS = frozenset(inspect.signature(AnnealingSearch.check_options).parameters)


@dataclasses.dataclass
class Round:
    """One AutoCompress round: its goal (fraction of the original), the annealing search's
    result, what ADMM's hard prune left and the score of that model (before the final fine-tune)."""

    index: int
    goal: float
    search: SearchResult | None
    macs: int
    params: int
    score: float
    admm_residual: float | None = None

    def summary(self) -> dict[str, Any]:
        search = self.search
        return {"index": self.index, "goal": self.goal, "macs": self.macs, "params": self.params, "score": self.score,
                "admm_residual": self.admm_residual,
                "ratios": None if search is None else {str(k): v for k, v in search.ratios.items()},
                "evaluations": None if search is None else len(search.history)}


@dataclasses.dataclass
class AutoCompressResult:
    """The compressed model (a copy; the user's model is untouched), its score after the final
    fine-tune (or after the last round without one), what it keeps, every round, and ``plan``:
    the removals the rounds made (``torchslim.save(model, path, result.plan)`` writes a
    checkpoint that ``torchslim.load`` rebuilds from the model AutoCompress was given)."""

    model: nn.Module
    score: float
    macs: int
    params: int
    original_macs: int
    original_params: int
    rounds: list[Round]
    plan: PruningPlan
    path: Path | None = None

    @property
    def history(self) -> list[Record]:
        """Every evaluation of every round's search, in order."""
        return [r for rnd in self.rounds if rnd.search is not None for r in rnd.search.history]


class AutoCompress:
    """AutoCompress (see the module docstring). ``target_macs`` or ``target_params`` (a fraction
    of the original if <= 1, else absolute); ``rounds`` (R); ``evals_per_round``: annealing
    evaluations per round (its temperature schedule gives 16 + 1 with the defaults);
    ``annealing``: options of :class:`AnnealingSearch` (temperatures, perturbation); ``rho``,
    ``rho_growth``, ``rho_max``, ``update_every``: ADMM's schedule (validated before anything
    runs). ``history``: a directory receiving each round's search history, summary and model;
    ``resume``: such a directory, rounds already finished are loaded, not redone."""

    method = "autocompress"

    def __init__(self, model: nn.Module, example_inputs: Any, evaluate: Evaluator, admm_train: AdmmTrain, *,
                 target_macs: float | None = None, target_params: float | None = None, rounds: int = 2,
                 evals_per_round: int | None = None, annealing: dict[str, Any] | None = None,
                 rho: float = 1e-3, rho_growth: float = 1.3, rho_max: float = 1.0, update_every: int = 50,
                 finetune: Finetuner | None = None, finetune_budget: Any = None,
                 final_finetune: Finetuner | None = None, data: Any = None, loss_fn: Any = None,
                 recalibrate_bn: bool = False, seed: int = 0, criterion: Any = None,
                 config: PruneConfig | None = None, history: str | os.PathLike | None = None,
                 resume: str | os.PathLike | None = None, executor: Executor | None = None,
                 on_record: Callable[[Record], Any] | None = None):
        if not callable(evaluate) or not callable(admm_train):
            raise TypeError("evaluate (model -> float) and admm_train (model, admm -> None) must be callables")
        if final_finetune is not None and not callable(final_finetune):
            raise TypeError(f"final_finetune must be a callable (model, budget) -> None, got {type(final_finetune)}")
        if (target_macs is None) == (target_params is None):
            raise ValueError("AutoCompress needs exactly one budget: target_macs or target_params (a latency "
                             "budget changes meaning as rounds retrain the weights: use NetAdaptSearch)")
        value = target_macs if target_macs is not None else target_params
        assert value is not None
        if not value > 0:
            raise ValueError(f"the budget must be > 0, got {value}")
        if rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {rounds}")
        if evals_per_round is not None and evals_per_round < 1:
            raise ValueError(f"evals_per_round must be >= 1 or None, got {evals_per_round}")
        if recalibrate_bn and data is None:
            raise ValueError("recalibrate_bn=True needs data= (the batches BatchNorm statistics are estimated on)")
        if history is not None and resume is not None and Path(history) != Path(resume):
            raise ValueError("give history= or resume=, not both: a resumed run writes to the directory it resumes")
        check_admm_schedule(rho, rho_growth, rho_max, update_every)
        self.annealing = dict(annealing or {})
        unknown = sorted(set(self.annealing) - ANNEALING_OPTIONS)
        if unknown:
            raise ValueError(f"annealing: unknown option(s) {unknown}; known: {sorted(ANNEALING_OPTIONS)}")
        AnnealingSearch.check_options(**self.annealing)
        self.model, self.example_inputs, self.evaluate, self.admm_train = model, example_inputs, evaluate, admm_train
        self.quantity = "macs" if target_macs is not None else "params"
        self.value, self.rounds, self.evals_per_round = float(value), rounds, evals_per_round
        self.admm_options: dict[str, Any] = {"rho": rho, "rho_growth": rho_growth, "rho_max": rho_max, "update_every": update_every}
        self.finetune, self.finetune_budget, self.final_finetune = finetune, finetune_budget, final_finetune
        self.data, self.loss_fn, self.recalibrate_bn, self.seed = data, loss_fn, recalibrate_bn, seed
        self.criterion, self.config, self.executor, self.on_record = criterion, config, executor, on_record
        folder = resume if resume is not None else history
        self.directory = Path(folder) if folder is not None else None
        self.resuming = resume is not None
        if self.resuming and not (self.directory and self.directory.is_dir()):
            raise ValueError(f"resume={resume}: no such directory (run once with history=DIR)")

    # the loop ----------------------------------------------------------------------------------
    def run(self) -> AutoCompressResult:
        """All rounds, then the final fine-tune; the user's model is not touched."""
        current = copy.deepcopy(self.model)
        original = self._measure(current)
        goal_total = self.value if self.value <= 1 else self.value / original[self.quantity]
        if not goal_total < 1:
            raise ValueError(f"target_{self.quantity}={self.value:g} does not ask for any reduction "
                             f"(the model has {original[self.quantity]} {self.quantity})")
        done: list[Round] = []
        for index in range(1, self.rounds + 1):
            goal = goal_total ** (index / self.rounds)
            loaded = self._load_round(index, goal)
            if loaded is not None:
                current, finished = loaded
            else:
                finished = self._round(current, index, goal, original)
            done.append(finished)
        score = done[-1].score
        if self.final_finetune is not None:
            current.train()
            self.final_finetune(current, self.finetune_budget)
            current.eval()
            score = self._score(current)
        found = self._measure(current)
        return AutoCompressResult(current.eval(), score, found["macs"], found["params"], original["macs"],
                                  original["params"], done, PruningPlan(_steps(current)[len(_steps(self.model)):]),
                                  self.directory)

    def _round(self, model: nn.Module, index: int, goal: float, original: dict[str, int]) -> Round:
        """Search, ADMM-train and hard-prune ``model`` in place to ``goal`` of the original."""
        now = self._measure(model)
        fraction = goal * original[self.quantity] / now[self.quantity]
        if fraction >= 1:  # an earlier round already went past this goal
            return self._finish(model, index, goal, None, None)
        search = self._search(model, index, min(fraction, 1.0))
        result = search.run()
        admm = ADMMPruner(model, self.example_inputs, result.config, **self.admm_options)
        model.train()
        self.admm_train(model, admm)
        residual = admm.residual()
        admm.finalize_()
        model.eval()
        found = self._measure(model)
        if found[self.quantity] != getattr(result, self.quantity):
            warnings.warn(f"autocompress round {index}: the hard prune left {found[self.quantity]} {self.quantity}, "
                          f"the search evaluated {getattr(result, self.quantity)}", SearchWarning, stacklevel=3)
        return self._finish(model, index, goal, result, residual)

    def _search(self, model: nn.Module, index: int, fraction: float) -> AnnealingSearch:
        history = None if self.directory is None else self.directory / f"round{index}.jsonl"
        kwargs: dict[str, Any] = {f"target_{self.quantity}": fraction}
        if history is not None:
            history.parent.mkdir(parents=True, exist_ok=True)
            kwargs["resume" if self.resuming and history.exists() else "history"] = history
        return AnnealingSearch(model, self.example_inputs, self.evaluate, finetune=self.finetune,
                               finetune_budget=self.finetune_budget, data=self.data, loss_fn=self.loss_fn,
                               recalibrate_bn=self.recalibrate_bn, max_evals=self.evals_per_round,
                               seed=self.seed + index, criterion=self.criterion, config=self.config,
                               executor=self.executor, on_record=self.on_record, reference=self.model, **kwargs,
                               **self.annealing)

    def _finish(self, model: nn.Module, index: int, goal: float, result: SearchResult | None,
                residual: float | None) -> Round:
        if self.recalibrate_bn:  # the statistics ADMM training left include the channels just removed
            from torchslim.recovery import recalibrate_bn_

            recalibrate_bn_(model, self.data)
        found = self._measure(model)
        finished = Round(index, goal, result, found["macs"], found["params"], self._score(model), residual)
        if self.directory is not None:
            from torchslim.io import save

            save(model, self.directory / f"round{index}")
            (self.directory / f"round{index}" / ROUND_FILE).write_text(json.dumps(finished.summary(), indent=1))
        return finished

    def _load_round(self, index: int, goal: float) -> tuple[nn.Module, Round] | None:
        """A finished round of the resumed directory: (its model, its summary), else None."""
        if not self.resuming or self.directory is None:
            return None
        folder = self.directory / f"round{index}"
        if not (folder / ROUND_FILE).exists():
            return None
        from torchslim.io import load

        summary = json.loads((folder / ROUND_FILE).read_text())
        if abs(summary["goal"] - goal) > 1e-9:
            raise ValueError(f"cannot resume {folder}: its goal was {summary['goal']:.6g} of the original, this run "
                             f"aims at {goal:.6g} (a different budget or number of rounds)")
        model = load(folder, copy.deepcopy(self.model)).eval()
        return model, Round(index, goal, None, summary["macs"], summary["params"], summary["score"],
                            summary["admm_residual"])

    # measures ----------------------------------------------------------------------------------
    def _measure(self, model: nn.Module) -> dict[str, int]:
        graph = DependencyGraph.build(model, self.example_inputs)
        return {"macs": int(estimate_macs(graph)), "params": sum(p.numel() for p in model.parameters())}

    def _score(self, model: nn.Module) -> float:
        """The evaluator on a copy of ``model`` in eval mode."""
        return float(self.evaluate(copy.deepcopy(model).eval()))


def _steps(model: nn.Module) -> list:
    return pruning_history(model).steps


def admm_trainer(batches: Iterable[Any], loss_fn: Callable[..., torch.Tensor], *, epochs: int = 1,
                 lr: float = 1e-3, optimizer: str = "adam") -> AdmmTrain:
    """A ready ``admm_train``: ``epochs`` passes over ``batches`` of ``(inputs, targets)``,
    ``loss_fn(outputs, targets) + admm.penalty()``, Adam or SGD (momentum 0.9) at ``lr``."""
    if epochs < 1 or not lr > 0:
        raise ValueError(f"need epochs >= 1 and lr > 0, got {epochs}, {lr}")
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    batches = list(batches)

    def train(model: nn.Module, admm: ADMMPruner) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = (torch.optim.Adam(params, lr=lr) if optimizer == "adam" else
               torch.optim.SGD(params, lr=lr, momentum=0.9))
        for _ in range(epochs):
            for inputs, targets in batches:
                opt.zero_grad()
                loss = loss_fn(model(inputs), targets) + admm.penalty()
                loss.backward()
                opt.step()
                admm.step()

    return train
