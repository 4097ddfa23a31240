"""The analysis report: per-module rows, totals, prefix roll-ups, top-k, JSON and a rich table."""
from __future__ import annotations

import dataclasses
import json
from typing import Any


@dataclasses.dataclass
class LayerRow:
    """One module. ``params`` and ``macs`` include the module's children (containers sum them)."""

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


@dataclasses.dataclass
class AnalysisReport:
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

    def layer(self, name: str) -> LayerRow:
        for row in self.layers:
            if row.name == name:
                return row
        raise KeyError(f"no module named '{name}' in the report")

    def rollup(self, depth: int = 1, key: str = "macs") -> list[LayerRow]:
        """Modules at exactly ``depth`` dots below the root (1 = direct children), sorted by ``key``."""
        rows = [r for r in self.layers if r.name and r.name.count(".") == depth - 1]
        return sorted(rows, key=lambda r: getattr(r, key) or 0, reverse=True)

    def top(self, k: int = 10, key: str = "macs") -> list[LayerRow]:
        """The ``k`` heaviest leaf modules by ``key`` (macs, params, latency_ms, activation_bytes)."""
        leaves = [r for r in self.layers if r.is_leaf and r.name]
        return sorted(leaves, key=lambda r: getattr(r, key) or 0, reverse=True)[:k]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AnalysisReport":
        data = dict(data)
        data["layers"] = [LayerRow(**row) for row in data["layers"]]
        return cls(**data)

    def render(self, console=None, top: int = 15, depth: int = 1) -> None:
        """Print totals, the roll-up at ``depth`` and the ``top`` heaviest layers with rich."""
        from rich.console import Console
        from rich.table import Table

        console = console or Console()
        lat = f"{self.latency_ms:.2f} ms (p10 {self.latency_p10_ms:.2f}, p90 {self.latency_p90_ms:.2f}, {self.threads} threads)" if self.latency_ms else "not measured"
        console.print(f"[bold]{self.model}[/]  params {self.total_params / 1e6:.3f} M  MACs {self.total_macs / 1e6:.2f} M  "
                      f"size {self.disk_bytes / 1e6:.2f} MB  latency {lat}")
        for title, rows in ((f"by module (depth {depth})", self.rollup(depth)), (f"top {top} layers by MACs", self.top(top))):
            table = Table(title=title)
            for col in ("module", "type", "params", "MACs (M)", "MACs %", "output", "act (KB)", "latency ms", "time %"):
                table.add_column(col, justify="left" if col in ("module", "type", "output") else "right")
            for r in rows:
                table.add_row(r.name, r.type, f"{r.params:,}", f"{r.macs / 1e6:.2f}",
                              f"{100 * r.macs / max(self.total_macs, 1):.1f}",
                              " ".join("x".join(map(str, s)) for s in r.output_shape[:2]),
                              f"{r.activation_bytes / 1024:.1f}",
                              "-" if r.latency_ms is None else f"{r.latency_ms:.3f}",
                              "-" if r.latency_share is None else f"{100 * r.latency_share:.1f}")
            console.print(table)
