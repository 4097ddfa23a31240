"""NNI 2.10.1's AMCPruner and AutoCompressPruner on the task of benchmarks/search.py: the outside
anchors of AMCSearch and AutoCompress.

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

AutoCompressPruner (``--methods autocompress``) is set up as search.py sets up torchslim's
AutoCompress: 2 rounds (``total_iteration``), simulated annealing with NNI's default schedule
(16 candidates per round, L1 channel pruning) scored by the same evaluator, ADMM with 2
iterations of 1 training epoch (Adam, lr 1e-3, the task's training batches) per round,
coarse-grained (channels). NNI budgets it by ``total_sparsity``, the share of the conv
*weights* removed (its SimulatedAnnealing has no FLOPs target), set to ``1 - budget``; the
MACs it lands at are measured and reported.

Set-up (its own venv; torch 2.1 and torchvision 0.16 from PyPI):
  python3 -m venv /tmp/venv-nni && /tmp/venv-nni/bin/pip install torch==2.1.2 nni==2.10.1 tensorboard \
      scikit-learn 'numpy<2' rich safetensors pyyaml && /tmp/venv-nni/bin/pip install --no-deps torchvision==0.16.2 \
      && /tmp/venv-nni/bin/pip install --no-deps -e .
  /tmp/venv-nni/bin/python benchmarks/search_nni.py [--methods amc autocompress] [--budgets 0.5] [--seeds 0 1 2]
      [--episodes 12] [--out results/search_nni.json]
Writes benchmarks/results/search_nni.json (rows keyed as search.py's, methods "NNI AMC", "NNI AutoCompress").
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

METHODS = {"amc": "NNI AMC", "autocompress": "NNI AutoCompress"}
ADMM_EPOCHS = 2  # per round, as search.py's --admm-epochs


def nni_macs(model: torch.nn.Module, example: torch.Tensor) -> int:
    from nni.compression.pytorch.utils import count_flops_params

    flops, _, _ = count_flops_params(model, example, verbose=False)
    return int(flops)


def validation_score(task: Task):
    """What torchslim's searches maximise: validation accuracy after BatchNorm recalibration."""
    def evaluator(model: torch.nn.Module) -> float:
        scored = copy.deepcopy(model)
        recalibrate_bn_(scored, (b[0] for b in task.calibration))
        return evaluate_accuracy(scored, task.val)
    return evaluator


def dead_filters(masks: dict) -> dict[str, torch.Tensor]:
    """Per masked layer, which of its output filters the masks zero entirely."""
    return {name: m["weight"].flatten(1).sum(1) == 0 for name, m in masks.items()}


@torch.no_grad()
def hold_masks_(model: torch.nn.Module, masks: dict) -> None:
    """``model`` made to compute what removing the masked filters computes, and to keep doing so
    while fine-tuned: masked weights zero with zero gradients (Adam then never moves them), and
    the BatchNorm registered right after each masked conv (the digits CNN's layout) zeroed on
    the dead channels, gradients held too (else it emits its bias there, and batch statistics
    of a zero channel would let training revive it)."""
    modules = list(model.named_modules())
    dead = dead_filters(masks)
    for (name, layer), (_, following) in zip(modules, modules[1:]):
        if name not in masks:
            continue
        for key, mask in masks[name].items():
            tensor = getattr(layer, key)
            tensor.mul_(mask)
            tensor.register_hook(lambda grad, mask=mask: grad * mask)
        if isinstance(following, torch.nn.BatchNorm2d):
            alive = (~dead[name]).to(following.weight.dtype)
            for tensor in (following.weight, following.bias):
                tensor.mul_(alive)
                tensor.register_hook(lambda grad, alive=alive: grad * alive)
            following.running_mean.mul_(alive)


def chain_macs(model: torch.nn.Module, example: torch.Tensor, masks: dict | None = None) -> int:
    """Conv2d and Linear MACs of a chain of layers (each consuming the previous one's output
    channels, as the digits CNN) with the masked filters counted as removed."""
    dead = dead_filters(masks or {})
    total, channels = 0, [example.shape[1]]

    def count(name: str):
        def hook(layer, inputs, output):
            nonlocal total
            kept = int(layer.weight.shape[0] - (dead[name].sum().item() if name in dead else 0))
            spatial = output[0, 0].numel() if isinstance(layer, torch.nn.Conv2d) else 1
            window = layer.weight[0, 0].numel() if isinstance(layer, torch.nn.Conv2d) else 1
            groups = getattr(layer, "groups", 1)
            total += kept * channels[-1] // groups * window * spatial
            channels.append(kept)
        return hook

    handles = [layer.register_forward_hook(count(name)) for name, layer in model.named_modules()
               if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        model.eval()(example)
    for handle in handles:
        handle.remove()
    return total


def speedup(best: torch.nn.Module, masks: dict, example: torch.Tensor, label: str) -> torch.nn.Module:
    """``best`` with its masks removed by ModelSpeedup (none: NNI already handed back a compact model)."""
    from nni.compression.pytorch.speedup import ModelSpeedup

    best = best.eval()
    if masks:
        ModelSpeedup(best, example, masks).speedup_model()
    print(f"{label} best:", [tuple(m.weight.shape) for m in best.modules() if isinstance(m, torch.nn.Conv2d)],
          flush=True)
    return best


def run_autocompress(task: Task, budget: float, episodes: int) -> tuple[torch.nn.Module, float, dict | None]:
    """The best AutoCompressPruner result, physically pruned, the seconds it took and None; where
    NNI's ModelSpeedup fails on it, the masked model held to its masks (the same function) and
    the row's MACs share counted from the masks."""
    import nni
    import torch.nn.functional as F
    from nni.algorithms.compression.v2.pytorch.pruning import AutoCompressPruner
    from nni.compression.pytorch import TorchEvaluator

    def training_func(model, optimizers, criterion, lr_schedulers=None, max_steps=None, max_epochs=None):
        model.train()
        steps = 0
        for _ in range(max_epochs or 1):
            for inputs, targets in task.train:
                optimizers.zero_grad()
                criterion(model(inputs), targets).backward()
                optimizers.step()
                steps += 1
                if max_steps is not None and steps >= max_steps:
                    return

    model = copy.deepcopy(task.model).eval()
    example = task.example[0]
    score = validation_score(task)
    evaluator = TorchEvaluator(training_func, nni.trace(torch.optim.Adam)(model.parameters(), lr=1e-3),
                               F.cross_entropy, dummy_input=example, evaluating_func=score)
    config = [{"op_types": ["Conv2d"], "total_sparsity": 1.0 - budget}]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as log_dir:
        pruner = AutoCompressPruner(model, config, total_iteration=2,
                                    admm_params={"evaluator": evaluator, "iterations": ADMM_EPOCHS,
                                                 "training_epochs": 1, "granularity": "coarse-grained"},
                                    sa_params={"evaluator": evaluator, "pruning_algorithm": "l1"},
                                    log_dir=log_dir, evaluator=evaluator, speedup=False)
        pruner.compress()
        _, best, masks, _, _ = pruner.get_best_result()
    seconds = time.perf_counter() - start
    broken = [n for n, p in best.named_parameters() if not torch.isfinite(p).all()]
    if broken:  # seen on the digits CNN: its ADMM returns NaN weights, and ModelSpeedup then fails
        print(f"NNI AutoCompress: non-finite weights in {len(broken)} tensors ({', '.join(broken[:3])}...)", flush=True)
    try:
        return speedup(copy.deepcopy(best), copy.deepcopy(masks), example, "NNI AutoCompress"), seconds, None
    except Exception as error:  # noqa: BLE001 - NNI's ShapeMisMatchError, named in the row
        hold_masks_(best, masks)
        share = chain_macs(best, example, masks) / chain_macs(task.model, example)
        print(f"NNI AutoCompress: ModelSpeedup failed ({type(error).__name__}); scoring the masked model, "
              f"{share:.3f} of the MACs by its masks", flush=True)
        return best.eval(), seconds, {"macs_ratio": share, "pruned_by": f"masks (ModelSpeedup: {type(error).__name__})",
                                      "nonfinite_tensors": len(broken)}


def run_amc(task: Task, budget: float, episodes: int) -> tuple[torch.nn.Module, float, None]:
    """The best AMC result, physically pruned by ModelSpeedup, and the seconds it took."""
    from nni.algorithms.compression.v2.pytorch.pruning import AMCPruner

    evaluator = validation_score(task)
    model = copy.deepcopy(task.model).eval()
    example = task.example[0]
    config = [{"op_types": ["Conv2d"], "total_sparsity": 1.0 - budget, "max_sparsity_per_layer": 0.8}]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as log_dir:
        pruner = AMCPruner(episodes, model, config, example, evaluator, pruning_algorithm="l1", log_dir=log_dir,
                           target="flops")
        pruner.compress()
        _, best, masks, _, _ = pruner.get_best_result()
    return speedup(best, masks, example, "NNI AMC"), time.perf_counter() - start, None


def run_task(seed: int, args) -> list[dict]:
    task = Task("digits_cnn", seed, args.train_epochs)
    example = task.example[0]
    unpruned = nni_macs(task.model, example)
    rows = []
    for budget in args.budgets:
        for method in args.methods:
            run = run_amc if method == "amc" else run_autocompress
            model, seconds, masked = run(task, budget, args.episodes)
            row = {"model": "digits_cnn", "seed": seed, "budget": budget, "method": METHODS[method],
                   "evaluations": args.episodes if method == "amc" else None,
                   "epochs_before_score": 0 if method == "amc" else 2 * ADMM_EPOCHS, "seconds": seconds,
                   "original_accuracy": task.accuracy, "nni_unpruned_macs": unpruned, "pruned_by": "ModelSpeedup"}
            row.update(masked or {"macs_ratio": nni_macs(model, example) / unpruned})
            rows.append(task.finish(model, row, args.finetune_epochs))
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        for budget in sorted({r["budget"] for r in rows}, reverse=True):
            mine = [r for r in rows if r["budget"] == budget and r["method"] == method]
            if not mine:
                continue
            stat = lambda k, mine=mine: (statistics.mean(r[k] for r in mine), statistics.pstdev(r[k] for r in mine))  # noqa: E731
            out.append({"model": "digits_cnn", "budget": budget, "method": method, "seeds": len(mine),
                        **{k: stat(k) for k in ("accuracy_after_pruning", "accuracy_after_finetune", "macs_ratio",
                                                "seconds", "original_accuracy")},
                        "evaluations": mine[0]["evaluations"], "epochs_before_score": mine[0]["epochs_before_score"]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="*", choices=sorted(METHODS), default=["amc"])
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
        print(f"{s['method']}, budget {s['budget']}: MACs {s['macs_ratio'][0]:.3f}, right after {100 * s['accuracy_after_pruning'][0]:.1f}"
              f" ± {100 * s['accuracy_after_pruning'][1]:.1f}, after fine-tune {100 * s['accuracy_after_finetune'][0]:.1f}"
              f" ± {100 * s['accuracy_after_finetune'][1]:.1f}, {s['seconds'][0]:.0f} s")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
