"""The analysis report: one row per module, totals, prefix roll-ups, top-k, JSON and a rich table.

Rows cover every module ``model.named_modules()`` lists -- the root (name ``""``),
containers and leaves. A module registered under two names (MODNet's ``lr_branch.backbone``
*is* ``backbone``) appears once, under its first name, and counts there only.

Per row:

* ``params`` -- parameters of the module and its submodules (each tensor once);
  ``self_params`` those registered directly on it.
* ``macs`` -- MACs of the module and its submodules; ``self_macs`` the MACs of ops its own
  ``forward`` ran outside any submodule call (e.g. ``F.interpolate`` in a branch's forward).
  Convention: :mod:`torchslim.graph.macs`.
* ``output_shape`` -- shapes of the tensors in the module's output (first call);
  ``activation_bytes`` -- bytes of those output tensors, summed over all calls; ``calls``.
* ``latency_ms`` -- median time per run inside the module's forward (children included);
  ``self_latency_ms`` the part outside child-module calls; ``latency_share`` =
  ``latency_ms`` / the whole model's median latency. ``None`` when not measured or never run.

``rollup(depth)`` groups the model by module-name prefix of ``depth`` components, each op,
parameter and self-time counted once, so a roll-up's rows add up to the totals.
"""
from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import JustifyMethod

ROLLUP_KEYS = ("macs", "params", "latency_ms", "activation_bytes")
TOP_KEYS = ("macs", "params", "latency_ms", "self_latency_ms", "activation_bytes", "self_macs")


@dataclasses.dataclass
class LayerRow:
    """One module (see the module docstring for what each figure includes)."""

    name: str
    type: str
    params: int
    macs: int
    output_shape: list[list[int]]
    activation_bytes: int
    latency_ms: float | None = None
    latency_share: float | None = None
    is_leaf: bool = True
    calls: int = 1
    self_params: int = 0
    self_macs: int = 0
    self_latency_ms: float | None = None

    @property
    def depth(self) -> int:
        """Components in the qualified name: 0 for the root, 1 for its children, ..."""
        return self.name.count(".") + 1 if self.name else 0


@dataclasses.dataclass
class RollupRow:
    """Everything under one module-name prefix.

    ``own`` rows hold what a container shallower than the roll-up depth does itself (its
    own ops and parameters, outside its submodules); ``name`` ``""`` is the root model.
    """

    name: str
    type: str
    params: int
    macs: int
    macs_share: float
    latency_ms: float | None
    latency_share: float | None
    activation_bytes: int
    modules: int
    own: bool = False

    @property
    def label(self) -> str:
        base = self.name or "(model)"
        return f"{base} (own ops)" if self.own else base


def _column_style(col: str) -> dict[str, Any]:
    """Narrow terminals fold cells onto several lines rather than cutting them."""
    if col in ("module", "layer"):
        return {"overflow": "fold", "min_width": 16, "ratio": 4}
    if col in ("type", "output"):
        return {"overflow": "ellipsis", "max_width": 16}
    return {"overflow": "fold"}


def _sort_value(row: Any, key: str) -> float:
    value = getattr(row, key)
    return float("-inf") if value is None else value


@dataclasses.dataclass
class AnalysisReport:
    """What :func:`torchslim.analyze` measured. Sizes in bytes, latencies in milliseconds."""

    model: str
    layers: list[LayerRow]
    total_params: int
    total_macs: int
    state_dict_bytes: int
    disk_bytes: int
    latency_ms: float | None
    latency_p10_ms: float | None
    latency_p90_ms: float | None
    threads: int | None
    input_shapes: list[list[int]]
    macs_by_op: dict[str, int] = dataclasses.field(default_factory=dict)
    latency_runs: int | None = None
    training: bool = False  # the model's training flag (analysis itself runs in eval mode)
    latency_rounds_ms: list[float] | None = None  # every timing round's median; the lowest is latency_ms

    # ------------------------------------------------------------------ lookups
    def layer(self, name: str) -> LayerRow:
        for row in self.layers:
            if row.name == name:
                return row
        raise KeyError(f"no module named '{name}' in the report")

    def leaves(self) -> list[LayerRow]:
        """Rows of modules without submodules, in model order."""
        return [r for r in self.layers if r.is_leaf and r.name]

    def top(self, k: int = 10, key: str = "macs") -> list[LayerRow]:
        """The ``k`` heaviest leaf modules by ``key`` (macs, params, latency_ms, activation_bytes, ...)."""
        if key not in TOP_KEYS:
            raise ValueError(f"key must be one of {', '.join(TOP_KEYS)}; got '{key}'")
        return sorted(self.leaves(), key=lambda r: _sort_value(r, key), reverse=True)[: max(k, 0)]

    def rollup(self, depth: int = 1, key: str = "macs") -> list[RollupRow]:
        """Totals per module-name prefix of ``depth`` components, heaviest first by ``key``.

        Modules deeper than ``depth`` add into their prefix; leaves shallower than ``depth``
        are rows of their own; a container shallower than ``depth`` gets an ``own`` row for
        the ops and parameters that belong to none of its submodules (only when non-zero).
        The rows partition the model: their params and MACs add up to the totals. Latency is
        the sum of the group's per-module self times (medians), shared by the whole model's
        median latency.
        """
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if key not in ROLLUP_KEYS:
            raise ValueError(f"key must be one of {', '.join(ROLLUP_KEYS)}; got '{key}'")
        by_name = {r.name: r for r in self.layers}
        groups: dict[str, dict[str, Any]] = {}
        for row in self.layers:
            prefix = ".".join(row.name.split(".")[:depth]) if row.name else ""
            group = groups.setdefault(prefix, {"params": 0, "macs": 0, "latency": None, "act": 0, "modules": 0})
            group["params"] += row.self_params
            group["macs"] += row.self_macs
            group["modules"] += 1
            if row.self_latency_ms is not None:
                group["latency"] = (group["latency"] or 0.0) + row.self_latency_ms
            if row.name == prefix:  # the prefix module itself: its output is the group's output
                group["act"] = row.activation_bytes
        rows = []
        for prefix, g in groups.items():
            head = by_name[prefix]
            own = head.depth < depth and not head.is_leaf
            if own and not (g["params"] or g["macs"]):
                continue
            rows.append(RollupRow(
                name=prefix, type=head.type, params=g["params"], macs=g["macs"],
                macs_share=g["macs"] / self.total_macs if self.total_macs else 0.0,
                latency_ms=g["latency"],
                latency_share=(g["latency"] / self.latency_ms) if g["latency"] is not None and self.latency_ms else None,
                activation_bytes=0 if own else g["act"], modules=g["modules"], own=own,
            ))
        return sorted(rows, key=lambda r: _sort_value(r, key), reverse=True)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AnalysisReport":
        data = dict(data)
        data["layers"] = [LayerRow(**row) for row in data["layers"]]
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "AnalysisReport":
        return cls.from_dict(json.loads(text))

    # ------------------------------------------------------------------ display
    def summary(self) -> str:
        if self.latency_ms is not None:
            rounds = self.latency_rounds_ms or []
            runs = (f"best of {len(rounds)} rounds of {self.latency_runs} runs, round medians "
                    f"{min(rounds):.2f}-{max(rounds):.2f}" if len(rounds) > 1 else f"{self.latency_runs} runs")
            lat = (f"{self.latency_ms:.2f} ms median (p10 {self.latency_p10_ms:.2f}, p90 {self.latency_p90_ms:.2f}; "
                   f"{runs}; {self.threads} threads)")
        else:
            lat = "not measured"
        inputs = ", ".join("x".join(map(str, s)) for s in self.input_shapes)
        return (f"{self.model} on {inputs}: {self.total_params / 1e6:.3f} M params, {self.total_macs / 1e6:.2f} M MACs, "
                f"state_dict {self.state_dict_bytes / 1e6:.2f} MB (saved {self.disk_bytes / 1e6:.2f} MB), latency {lat}")

    def render(self, console=None, top: int = 15, depth: int = 1) -> None:
        """Print the totals, the roll-up at ``depth`` and the ``top`` heaviest leaf layers with rich."""
        from rich.console import Console
        from rich.table import Table

        console = console or Console()
        pct = lambda part, whole: f"{100 * part / whole:.1f}" if whole else "-"  # noqa: E731
        ms = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731

        table = Table(title=f"by module prefix (depth {depth})", show_footer=True)
        columns: tuple[tuple[str, str, JustifyMethod], ...] = (
            ("module", "total", "left"), ("type", "", "left"), ("params", f"{self.total_params:,}", "right"),
            ("MACs (M)", f"{self.total_macs / 1e6:,.2f}", "right"), ("MACs %", "100.0", "right"),
            ("latency ms", ms(self.latency_ms), "right"), ("time %", "", "right"))
        for col, footer, justify in columns:
            table.add_column(col, footer=footer, justify=justify, **_column_style(col))
        for r in self.rollup(depth):
            table.add_row(r.label, r.type, f"{r.params:,}", f"{r.macs / 1e6:,.2f}", pct(r.macs, self.total_macs),
                          ms(r.latency_ms), "-" if r.latency_share is None else f"{100 * r.latency_share:.1f}")
        console.print(table)

        if top > 0:
            table = Table(title=f"top {top} layers by MACs")
            for col in ("layer", "type", "params", "MACs (M)", "MACs %", "output", "act (KB)", "latency ms", "time %"):
                table.add_column(col, justify="left" if col in ("layer", "type", "output") else "right",
                                 **_column_style(col))
            for layer in self.top(top):
                table.add_row(layer.name, layer.type, f"{layer.params:,}", f"{layer.macs / 1e6:,.2f}",
                              pct(layer.macs, self.total_macs),
                              " ".join("x".join(map(str, s)) for s in layer.output_shape[:2]),
                              f"{layer.activation_bytes / 1024:,.1f}", ms(layer.latency_ms),
                              "-" if layer.latency_share is None else f"{100 * layer.latency_share:.1f}")
            console.print(table)
        console.print(self.summary())
