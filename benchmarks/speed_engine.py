"""Engine speed: graph building + 50% pruning, torchslim vs Torch-Pruning in the same run,
and a ~1B-parameter Llama (grouped-query attention) pruned from its config.

Prints a rich table and writes benchmarks/results/speed_engine.json.
Also the graph's memory across ResNet depths (linear in model size).
Usage: python benchmarks/speed_engine.py [--skip-llama] [--parts speed llama memory]
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torchvision
from rich.console import Console
from rich.table import Table

import torchslim


def time_torchslim(build, inputs, config) -> dict:
    model = build()
    start = time.perf_counter()
    result = torchslim.prune_(model, inputs, config)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "params": sum(p.numel() for p in model.parameters()), "macs_ratio": result.macs_after / result.macs_before}


def time_torch_pruning(build, inputs, ratio: float) -> dict:
    import torch_pruning as tp

    model = build()
    start = time.perf_counter()
    imp = tp.importance.MagnitudeImportance(p=1)
    ignored = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 1000]
    pruner = tp.pruner.MagnitudePruner(model, inputs, importance=imp, pruning_ratio=ratio, ignored_layers=ignored)
    pruner.step()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "params": sum(p.numel() for p in model.parameters())}


def forward_seconds(build, inputs, repeats: int = 5) -> float:
    """The best plain forward (eval, no_grad) of the unpruned model: both tools trace one, and
    torchslim also runs the pruned model once (all-or-nothing), so about 1.25 forwards of the
    time is compute neither can skip."""
    model = build()
    with torch.no_grad():
        model(inputs)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(inputs)
            times.append(time.perf_counter() - start)
    return min(times)


def summary(runs: list[dict]) -> dict:
    """The best run (its fields) plus the median time and every time, in run order."""
    times = [r["seconds"] for r in runs]
    best = min(runs, key=lambda r: r["seconds"])
    return {**best, "median_seconds": statistics.median(times), "all_seconds": times}


def llama_1b() -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                  num_attention_heads=32, num_key_value_heads=8, vocab_size=32000)
    start = time.perf_counter()
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32).eval()
    build_s = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, 32000, (1, 16))
    start = time.perf_counter()
    result = torchslim.prune_(model, ids, torchslim.PruneConfig(ratio=0.5, exact_only=True))
    seconds = time.perf_counter() - start
    return {"params_before": params, "params_after": sum(p.numel() for p in model.parameters()),
            "construct_seconds": build_s, "prune_seconds": seconds, "groups_pruned": result.groups_pruned,
            "heads_after": model.model.layers[0].self_attn.q_proj.out_features // 64,
            "kv_heads_after": model.model.layers[0].self_attn.k_proj.out_features // 64,
            "intermediate_after": model.model.layers[0].mlp.up_proj.out_features}


def graph_memory() -> list[dict]:
    """Peak Python/numpy memory of building the dependency graph (tracemalloc) across ResNet
    depths: it should grow linearly with the model (bytes per parameter roughly constant)."""
    import tracemalloc

    from torchslim.graph import DependencyGraph

    rows = []
    x = torch.randn(1, 3, 224, 224)
    for name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"):
        model = getattr(torchvision.models, name)().eval()
        params = sum(p.numel() for p in model.parameters())
        gc.collect()
        tracemalloc.start()
        graph = DependencyGraph.build(model, x)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        rows.append({"model": name, "params": params, "elements": int(graph.coupling.inexact.size),
                     "peak_bytes": peak, "bytes_per_param": peak / params})
        del graph, model
    return rows


def main() -> None:
    # exact_only=False: the same work as Torch-Pruning, which also prunes ViT's embedding width (its
    # LayerNorm-coupled, inexact group; the library's default leaves it out)
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-llama", action="store_true")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--parts", nargs="*", default=["speed", "llama", "memory"], choices=["speed", "llama", "memory"])
    args = parser.parse_args()
    if args.skip_llama and "llama" in args.parts:
        args.parts.remove("llama")
    console = Console()
    x = torch.randn(1, 3, 224, 224)
    results: dict = {"machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()}}
    for name in ("resnet50", "mobilenet_v2", "vit_b_16") if "speed" in args.parts else ():
        build = lambda name=name: getattr(torchvision.models, name)().eval()  # noqa: E731
        ours, theirs = [], []
        error = None
        time_torchslim(build, x, torchslim.PruneConfig(ratio=0.5, verify=False, exact_only=False))  # warm-up (lazy imports, caches)
        try:
            time_torch_pruning(build, x, 0.5)
        except Exception:  # noqa: BLE001 - recorded by the timed runs below
            pass
        for _ in range(args.repeats):  # in turn, so that load from elsewhere hits both alike
            ours.append(time_torchslim(build, x, torchslim.PruneConfig(ratio=0.5, verify=False, exact_only=False)))
            if error is None:
                try:
                    theirs.append(time_torch_pruning(build, x, 0.5))
                except Exception as exc:  # noqa: BLE001 - record the anchor's failure
                    error = {"error": f"{type(exc).__name__}: {exc}"[:200]}
            gc.collect()
        ours_verified = time_torchslim(build, x, torchslim.PruneConfig(ratio=0.5, exact_only=False))
        results[name] = {"torchslim": summary(ours), "torchslim_with_verify": ours_verified,
                         "torch_pruning": error or summary(theirs), "forward_seconds": forward_seconds(build, x)}
    if "llama" in args.parts:
        results["llama_1b"] = llama_1b()
    if "memory" in args.parts:
        results["graph_memory"] = graph_memory()
    table = Table(title=f"graph + 50% pruning time (s), {args.repeats} runs each in turn: best / median")
    for col in ("model", "torchslim", "torchslim + verify", "Torch-Pruning 1.6.1", "ratio best", "ratio median",
                "forward"):
        table.add_column(col, justify="right")
    for name in ("resnet50", "mobilenet_v2", "vit_b_16") if "speed" in args.parts else ():
        r = results[name]
        ours_r, tp = r["torchslim"], r["torch_pruning"]
        both = lambda d: f"{d['seconds']:.3f} / {d['median_seconds']:.3f}"  # noqa: E731
        table.add_row(name, both(ours_r), f"{r['torchslim_with_verify']['seconds']:.2f}",
                      both(tp) if "seconds" in tp else tp.get("error", "-")[:40],
                      f"{ours_r['seconds'] / tp['seconds']:.2f}" if "seconds" in tp else "-",
                      f"{ours_r['median_seconds'] / tp['median_seconds']:.2f}" if "seconds" in tp else "-",
                      f"{r['forward_seconds']:.3f}")
    console.print(table)
    if "llama_1b" in results:
        console.print({"llama_1b": results["llama_1b"]})
    if "graph_memory" in results:
        memory = Table(title="dependency graph memory (tracemalloc peak)")
        for col in ("model", "params (M)", "elements (M)", "peak MB", "bytes / param"):
            memory.add_column(col, justify="right")
        for r in results["graph_memory"]:
            memory.add_row(r["model"], f"{r['params'] / 1e6:.1f}", f"{r['elements'] / 1e6:.1f}",
                           f"{r['peak_bytes'] / 2**20:.0f}", f"{r['bytes_per_param']:.2f}")
        console.print(memory)
    out = Path(__file__).parent / "results" / "speed_engine.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if out.exists() else {}
    out.write_text(json.dumps({**previous, **results}, indent=2))  # a partial run keeps the other parts


if __name__ == "__main__":
    main()
