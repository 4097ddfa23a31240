"""NNI 2.10.1's AMCPruner on the task of benchmarks/search.py: the outside anchor of AMCSearch.

NNI 3.0 removed AMC (and AutoCompress, SimulatedAnnealing); 2.10.1 is the last release with
them and needs torch 2.1, so this runs in its own virtual environment on the very ``Task`` of
search.py (benchmarks/_digits_task.py: the same trained digits CNN per seed, the same splits;
torchslim's tracer does not run on torch 2.1, its training helpers do). AMC's evaluator is the
validation accuracy after BatchNorm recalibration (what torchslim's searches maximise); its
config prunes every Conv2d with ``total_sparsity = 1 - budget`` and ``target='flops'`` (the
share of FLOPs removed) and ``max_sparsity_per_layer`` 0.8; ``--episodes`` (12 by default, the
budget it was first tried with here) with NNI's default warm-up (a quarter of them). The best
result's masks are removed with NNI's ModelSpeedup, then the model is scored exactly as
search.py scores every method: test accuracy right after pruning with BatchNorm
recalibration, then after the same 2-epoch fine-tune. MACs by NNI's own counter
(``count_flops_params``), as a ratio to the unpruned model by the same counter (torchslim's
counter gives 2,388,608 MACs for the unpruned digits CNN; NNI's unpruned count is in the JSON).

Set-up (its own venv; torch 2.1 and torchvision 0.16 from PyPI):
  python3 -m venv /tmp/venv-nni && /tmp/venv-nni/bin/pip install torch==2.1.2 nni==2.10.1 tensorboard \
      scikit-learn 'numpy<2' rich safetensors pyyaml && /tmp/venv-nni/bin/pip install --no-deps torchvision==0.16.2 \
      && /tmp/venv-nni/bin/pip install --no-deps -e .
  /tmp/venv-nni/bin/python benchmarks/search_nni.py [--budgets 0.5] [--seeds 0 1 2] [--episodes 12]
Writes benchmarks/results/search_nni.json (rows keyed as search.py's, method "NNI AMC").
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _digits_task import Task
from torchslim.recovery import evaluate_accuracy, recalibrate_bn_

METHOD = "NNI AMC"


def nni_macs(model: torch.nn.Module, example: torch.Tensor) -> int:
    from nni.compression.pytorch.utils import count_flops_params

    flops, _, _ = count_flops_params(model, example, verbose=False)
    return int(flops)


def run_amc(task: Task, budget: float, episodes: int) -> tuple[torch.nn.Module, float]:
    """The best AMC result, physically pruned by ModelSpeedup, and the seconds it took."""
    from nni.algorithms.compression.v2.pytorch.pruning import AMCPruner
    from nni.compression.pytorch.speedup import ModelSpeedup

    def evaluator(model: torch.nn.Module) -> float:
        scored = copy.deepcopy(model)
        recalibrate_bn_(scored, (b[0] for b in task.calibration))
        return evaluate_accuracy(scored, task.val)

    model = copy.deepcopy(task.model).eval()
    example = task.example[0]
    config = [{"op_types": ["Conv2d"], "total_sparsity": 1.0 - budget, "max_sparsity_per_layer": 0.8}]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as log_dir:
        pruner = AMCPruner(episodes, model, config, example, evaluator, pruning_algorithm="l1", log_dir=log_dir,
                           target="flops")
        pruner.compress()
        _, best, masks, _, _ = pruner.get_best_result()
    best = best.eval()
    if masks:  # masks on the best model: remove them; none when NNI already handed back a compact model
        ModelSpeedup(best, example, masks).speedup_model()
    print("NNI AMC best:", [tuple(m.weight.shape) for m in best.modules() if isinstance(m, torch.nn.Conv2d)],
          flush=True)
    return best, time.perf_counter() - start


def run_task(seed: int, args) -> list[dict]:
    task = Task("digits_cnn", seed, args.train_epochs)
    example = task.example[0]
    unpruned = nni_macs(task.model, example)
    rows = []
    for budget in args.budgets:
        model, seconds = run_amc(task, budget, args.episodes)
        row = {"model": "digits_cnn", "seed": seed, "budget": budget, "method": METHOD, "evaluations": args.episodes,
               "epochs_before_score": 0, "seconds": seconds, "original_accuracy": task.accuracy,
               "macs_ratio": nni_macs(model, example) / unpruned, "nni_unpruned_macs": unpruned}
        rows.append(task.finish(model, row, args.finetune_epochs))
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for budget in sorted({r["budget"] for r in rows}, reverse=True):
        mine = [r for r in rows if r["budget"] == budget]
        stat = lambda k, mine=mine: (statistics.mean(r[k] for r in mine), statistics.pstdev(r[k] for r in mine))  # noqa: E731
        out.append({"model": "digits_cnn", "budget": budget, "method": METHOD, "seeds": len(mine),
                    **{k: stat(k) for k in ("accuracy_after_pruning", "accuracy_after_finetune", "macs_ratio",
                                            "seconds", "original_accuracy")},
                    "evaluations": statistics.mean(r["evaluations"] for r in mine), "epochs_before_score": 0})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", nargs="*", type=float, default=[0.5])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--episodes", type=int, default=12)
    parser.add_argument("--train-epochs", type=int, default=15)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "search_nni.json")
    args = parser.parse_args()
    logging.getLogger("nni").setLevel(logging.WARNING)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    rows: list[dict] = []
    for seed in args.seeds:
        rows += run_task(seed, args)
        machine = {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()}
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        args.out.write_text(json.dumps({"machine": machine, "settings": settings, "summary": summarize(rows),
                                        "rows": rows}, indent=2))
    for s in summarize(rows):
        print(f"budget {s['budget']}: MACs {s['macs_ratio'][0]:.3f}, right after {100 * s['accuracy_after_pruning'][0]:.1f}"
              f" ± {100 * s['accuracy_after_pruning'][1]:.1f}, after fine-tune {100 * s['accuracy_after_finetune'][0]:.1f}"
              f" ± {100 * s['accuracy_after_finetune'][1]:.1f}, {s['seconds'][0]:.0f} s")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
