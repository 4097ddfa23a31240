"""Pruning at LLM scale: a Llama-3-shaped model (bfloat16, random weights) pruned to half its
MACs by heads, KV heads and FFN units on this CPU, then saved with torchslim.save and
save_pretrained, with time and peak memory per phase.

The model is built on the meta device and materialised with ``to_empty`` (no initialisation),
each tensor filled from a random block of a million values at a random offset (a fresh
normal draw per element costs a minute for 8 B parameters on 2 cores and proves nothing more).
``prune_`` runs as a user calls it, verification included: one traced forward on 4 tokens for
the graph, the removal checked against the zeroed original (each weight zeroed only while the
layer reading it runs) and applied tensor by tensor (a sliced tensor keeps only its removed
slices for the rollback, so its old storage is freed at once).

Every layer is pruned alike (half of the KV groups with their query heads, the FFN ratio solved
from the config for 50% of the MACs, kept FFN widths in multiples of ``UNIT``), so that one config
describes the pruned model and ``from_pretrained`` rebuilds it: the script reloads it and
compares logits on the example tokens.

Memory: peak RSS ~= baseline B0 (interpreter, torch, transformers) + weight bytes W + max(G, 2 T),
with G = 75 bytes per traced tensor-dim index (the dependency graph while it is built: 12.9 M
indices, 0.9 GiB, for the 8b config; linear in layers x widths, not in parameters) and T the
largest sliced tensor (split into kept and removed slices): nothing holds a second copy of the
model. ``predicted_gib`` is that formula, ``bound_gib`` adds 0.25 GiB (code loaded on first
use, the importance buffer, the allocator's free lists); both are checked against the measured
peak. Phases, and prune_'s steps inside, are measured one by one (Linux: ``/proc/self/clear_refs``
resets the peak; so /usr/bin/time's maximum RSS is only the last window's).

Prints a rich table and writes benchmarks/results/llm_scale.json (rows by config, merged).
Usage: python benchmarks/llm_scale.py [--configs tiny 1b 8b] [--out DIR] [--threads 2]
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import math
import os
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import torchslim

GIB = 2**30
# Llama-3 shapes: 8b is Meta-Llama-3-8B's config, 1b Llama-3.2-1B's (tied embeddings), tiny a smoke test
CONFIGS: dict[str, dict] = {
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                 intermediate_size=512, vocab_size=1024, tie_word_embeddings=False),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False),
}
UNIT = {"tiny": 16, "1b": 128, "8b": 128}  # kept FFN widths are multiples of this
TOKENS = 4
GRAPH_BYTES_PER_ELEMENT = 75  # the dependency graph while it is built, per traced tensor dim index (measured)
SLACK_GIB = 0.25  # code loaded on first use, the importance buffer, the allocator's free lists
BLOCK = 1_000_003  # values drawn per tensor (prime: rows of any width start at different offsets)


# memory ----------------------------------------------------------------------------------
def _status(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return None


def rss_gib() -> float:
    return _status("VmRSS") or 0.0


def peak_gib() -> float:
    """Peak RSS since the last ``reset_peak`` (the process's, where the peak cannot be reset)."""
    peak = _status("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def reset_peak() -> bool:
    """Start a new peak RSS window (Linux >= 4.0); False where the peak cannot be reset."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Phases:
    """Time and peak RSS of each phase (phases may nest, and a phase entered several times
    adds up). Before every reset of the kernel's peak counter the peak so far is folded into
    every open phase, so nesting does not lose it."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, float]] = {}
        self.graph_elements = 0
        self._open: list[list[float]] = []  # per open phase: [its peak so far]

    def _checkpoint(self) -> None:
        peak = peak_gib()
        for window in self._open:
            window[0] = max(window[0], peak)
        reset_peak()

    def run(self, name: str, fn, *args, **kwargs):
        if not self._open:
            gc.collect()
        self._checkpoint()
        row = self.rows.setdefault(name, {"seconds": 0.0, "peak_gib": 0.0, "calls": 0})  # rows in opening order
        window = [rss_gib()]
        self._open.append(window)
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds = time.perf_counter() - start
            self._checkpoint()
            self._open.pop()  # phases close in the order opposite to their opening
            row["seconds"] += seconds
            row["peak_gib"] = max(row["peak_gib"], window[0])
            row["calls"] += 1
            row["rss_after_gib"] = rss_gib()

    def timed(self, name: str, fn):
        """``fn`` measured as phase ``name`` at every call."""
        return functools.wraps(fn)(lambda *args, **kwargs: self.run(name, fn, *args, **kwargs))


@contextlib.contextmanager
def prune_phases(phases: Phases):
    """Measure the steps of ``prune_`` as sub-phases, by wrapping the functions it calls (private
    names of ``torchslim.pruning.prune``; the tiny test runs this, so a rename shows)."""
    from torchslim.graph import DependencyGraph
    from torchslim.pruning import prune as engine
    from torchslim.pruning.selector import Selector

    build = DependencyGraph.__dict__["build"]
    select = Selector.select
    originals = {name: getattr(engine, name) for name in
                 ("make_importance", "_zeroed_outputs", "apply_removal", "run_recorded", "sync_hf_config")}

    def build_graph(cls, *args, **kwargs):
        graph = build.__func__(cls, *args, **kwargs)
        phases.graph_elements = graph.coupling.size  # tensor dims traced: what the graph's memory grows with
        return graph

    def make_importance(*args, **kwargs):
        importance = originals["make_importance"](*args, **kwargs)
        return phases.timed("  importance", importance)

    DependencyGraph.build = classmethod(phases.timed("  trace + graph", build_graph))
    Selector.select = phases.timed("  select", select)
    engine.make_importance = make_importance
    engine._zeroed_outputs = phases.timed("  zeroed reference", originals["_zeroed_outputs"])
    engine.apply_removal = phases.timed("  apply", originals["apply_removal"])
    engine.run_recorded = phases.timed("  pruned forward", originals["run_recorded"])
    engine.sync_hf_config = phases.timed("  sync hf config", originals["sync_hf_config"])
    try:
        yield
    finally:
        DependencyGraph.build = build
        Selector.select = select
        for name, fn in originals.items():
            setattr(engine, name, fn)


# model -----------------------------------------------------------------------------------
def llama_config(name: str):
    from transformers import LlamaConfig

    return LlamaConfig(**CONFIGS[name], max_position_embeddings=8192, rope_theta=500000.0)


def fill_(tensor: torch.Tensor, generator: torch.Generator, std: float = 0.02) -> None:
    """Random values: ``BLOCK`` normal draws, rotated by a random offset, tiled over the tensor."""
    flat = tensor.view(-1)
    block = torch.randn(min(BLOCK, flat.numel()), generator=generator).mul_(std).to(tensor.dtype)
    shift = int(torch.randint(0, block.numel(), (1,), generator=generator))
    block = torch.cat([block[shift:], block[:shift]])
    for start in range(0, flat.numel(), block.numel()):
        n = min(block.numel(), flat.numel() - start)
        flat[start:start + n].copy_(block[:n])


def build(name: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """``LlamaForCausalLM`` of config ``name`` in ``dtype``: built on the meta device, storage
    allocated without initialisation (tied embeddings tied again), filled with random values
    (norms at 1); the rotary table, a non-persistent buffer, is computed again on the CPU."""
    from transformers import LlamaForCausalLM

    config = llama_config(name)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)
    model.to_empty(device="cpu")
    model.tie_weights()  # to_empty gives each registration its own tensor: tie the LM head again
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                fill_(param, generator)
    model.model.rotary_emb = type(model.model.rotary_emb)(config)
    return model.eval()


def example_inputs(name: str, seed: int = 0):
    ids = torch.randint(0, CONFIGS[name]["vocab_size"], (1, TOKENS), generator=torch.Generator().manual_seed(seed))
    return ((), {"input_ids": ids, "use_cache": False})


def linear_macs(cfg: dict, kv_kept: float = 1.0, ffn_kept: float = 1.0) -> float:
    """MACs per token of the projections and the LM head (attention scores over a few tokens
    are negligible), with a fraction of the KV groups (and their query heads) and FFN units kept."""
    h, heads, kv, ffn = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["intermediate_size"]
    head_dim = h // heads
    attention = 2 * h * heads * head_dim + 2 * h * kv * head_dim  # q and o, k and v
    return cfg["num_hidden_layers"] * (kv_kept * attention + ffn_kept * 3 * h * ffn) + h * cfg["vocab_size"]


def uniform_config(name: str, target: float = 0.5) -> tuple[torchslim.PruneConfig, int]:
    """A per-group config pruning every layer alike to ``target`` of the MACs: half of the KV
    groups, and the FFN width (a multiple of ``UNIT``) that brings the MACs under the target."""
    cfg, unit = CONFIGS[name], UNIT[name]
    ffn = cfg["intermediate_size"]
    attention_only = linear_macs(cfg, 0.5, 0.0)
    per_unit = (linear_macs(cfg, 0.5, 1.0) - attention_only) / ffn
    kept = int((target * linear_macs(cfg) - attention_only) / per_unit) // unit * unit
    ratio = 1 - (kept - 0.5) / ffn  # keep_count rounds n x (1 - ratio) up: exactly `kept`
    return torchslim.PruneConfig(ratio=ratio, ratios={"*.self_attn.*": 0.5}, exact_only=True, round_to=unit), kept


def model_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes of every parameter and buffer, stored once; bytes of the largest one)."""
    seen, total, largest = set(), 0, 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        size = t.numel() * t.element_size()
        total, largest = total + size, max(largest, size)
    return total, largest


# the benchmark ---------------------------------------------------------------------------
def run(name: str, out: Path, reload: bool = True, keep: bool = False) -> dict:
    """Build, prune to half the MACs, save (torchslim and Hugging Face) and, with ``reload``,
    rebuild the pruned model with ``from_pretrained`` and compare its logits. Returns the row."""
    from transformers import LlamaForCausalLM

    phases = Phases()
    baseline = rss_gib()
    model = phases.run("build", lambda: build(name))
    params_before = sum(p.numel() for p in model.parameters())
    weights, largest = model_bytes(model)
    weights_itemsize = next(model.parameters()).element_size()
    inputs = example_inputs(name)
    config, ffn_kept = uniform_config(name)
    with prune_phases(phases):
        result = phases.run("prune", torchslim.prune_, model, inputs, config)
    params_after = sum(p.numel() for p in model.parameters())
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    head_dim = attn.head_dim
    ck, hf = out / f"{name}_torchslim", out / f"{name}_hf"
    for path in (ck, hf):
        shutil.rmtree(path, ignore_errors=True)
    phases.run("save", torchslim.save, model, ck, result)
    phases.run("save_pretrained", model.save_pretrained, hf)
    with torch.no_grad():
        logits = model(*inputs[0], **inputs[1]).logits
    del model
    reload_equal = None
    if reload:
        def reload_model():
            back = LlamaForCausalLM.from_pretrained(hf, dtype=torch.bfloat16).eval()
            with torch.no_grad():
                return torch.equal(back(*inputs[0], **inputs[1]).logits, logits)

        reload_equal = phases.run("from_pretrained", reload_model)
    if not keep:
        for path in (ck, hf):
            shutil.rmtree(path, ignore_errors=True)
    gc.collect()
    sliced = max((math.prod(shape) * weights_itemsize for step in result.plan.steps for shape in step.shapes.values()),
                 default=0)
    graph_gib = GRAPH_BYTES_PER_ELEMENT * phases.graph_elements / GIB
    predicted = baseline + weights / GIB + max(graph_gib, 2 * sliced / GIB)
    bound = predicted + SLACK_GIB
    # the run's peak: building, pruning and saving (the reload is a check, measured on its own)
    peak = max(p["peak_gib"] for phase, p in phases.rows.items() if phase != "from_pretrained")
    total = sum(phases.rows[phase]["seconds"] for phase in ("build", "prune", "save", "save_pretrained"))
    return {
        "config": name, **{k: v for k, v in CONFIGS[name].items()}, "dtype": "bfloat16", "tokens": TOKENS,
        "params_before": params_before, "params_after": params_after,
        "weights_gib": weights / GIB, "largest_tensor_gib": largest / GIB, "largest_sliced_gib": sliced / GIB,
        "graph_elements": phases.graph_elements, "graph_gib": graph_gib, "baseline_rss_gib": baseline,
        "macs_before": result.macs_before, "macs_after": result.macs_after,
        "macs_ratio": result.macs_after / result.macs_before, "max_abs_error": result.max_abs_error,
        "heads_after": attn.q_proj.out_features // head_dim, "kv_heads_after": attn.k_proj.out_features // head_dim,
        "ffn_after": mlp.up_proj.out_features, "ffn_planned": ffn_kept, "hf_config": result.hf_config,
        "phases": phases.rows, "build_s": phases.rows["build"]["seconds"], "prune_s": phases.rows["prune"]["seconds"],
        "save_s": phases.rows["save"]["seconds"], "save_pretrained_s": phases.rows["save_pretrained"]["seconds"],
        "total_s": total, "load_average_after": os.getloadavg()[0], "peak_rss_gib": peak,
        "predicted_gib": predicted, "bound_gib": bound, "within_bound": peak <= bound,
        "peak_over_weights": (peak - baseline) / (weights / GIB), "reload_equal": reload_equal,
        "reload_peak_gib": phases.rows["from_pretrained"]["peak_gib"] if reload else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="*", default=["tiny", "1b"], choices=sorted(CONFIGS))
    parser.add_argument("--out", type=Path, default=None, help="where the checkpoints go (a temporary directory)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-reload", action="store_true", help="skip from_pretrained and the logits check")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints written under --out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out or Path(tempfile.mkdtemp(prefix="llm_scale_"))
    out.mkdir(parents=True, exist_ok=True)
    rows = [run(name, out, reload=not args.no_reload, keep=args.keep) for name in args.configs]
    if args.out is None and not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    table = Table(title=f"Llama-3-shaped, bfloat16, pruned to 50% MACs (heads, KV heads, FFN), {args.threads} threads")
    for column in ("config", "params", "after", "MACs ratio", "build s", "prune s", "save s", "save_pretrained s",
                   "total s", "peak RSS GiB", "predicted GiB", "weights GiB", "reload equal"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(r["config"], f"{r['params_before'] / 1e9:.2f} B", f"{r['params_after'] / 1e9:.2f} B",
                      f"{r['macs_ratio']:.4f}", f"{r['build_s']:.1f}", f"{r['prune_s']:.1f}", f"{r['save_s']:.1f}",
                      f"{r['save_pretrained_s']:.1f}", f"{r['total_s']:.0f}", f"{r['peak_rss_gib']:.2f}", f"{r['predicted_gib']:.2f}",
                      f"{r['weights_gib']:.2f}", str(r["reload_equal"]))
    console = Console(width=160)
    console.print(table)
    for r in rows:
        steps = Table(title=f"{r['config']}: time and peak RSS per phase (prune_'s steps indented)")
        steps.add_column("phase", justify="left")
        for column in ("calls", "seconds", "peak RSS GiB", "RSS after GiB"):
            steps.add_column(column, justify="right")
        for name, p in r["phases"].items():
            steps.add_row(name, str(p["calls"]), f"{p['seconds']:.1f}", f"{p['peak_gib']:.2f}", f"{p['rss_after_gib']:.2f}")
        console.print(steps)
    path = Path(__file__).parent / "results" / "llm_scale.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    machine = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
               "memory_gib": _mem_total(), "torch": torch.__version__,
               "threads": args.threads}
    merged = {**previous.get("rows", {}), **{r["config"]: r for r in rows}}
    path.write_text(json.dumps({"machine": machine, "rows": merged}, indent=2, default=str))


def _mem_total() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            return int(f.readline().split()[1]) * 1024 / GIB
    except (OSError, ValueError, IndexError):
        return None


if __name__ == "__main__":
    main()
