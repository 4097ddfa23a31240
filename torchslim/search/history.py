"""A search's history: one JSON line per evaluation, appended and flushed as it is made.

The file starts with a header line (``{"format": "torchslim.search/1", "method": ..., "seed":
..., "target": ..., "space": ...}``) and then holds one record per evaluation (see
:class:`Record`). Each line is written whole and flushed to disk before the search goes on,
so a crash loses at most the evaluation in progress; a torn last line (killed mid-write) is
ignored when the file is read back. ``resume=path`` replays the records in order (the method
proposes the same candidates from the same seed and gets the recorded scores back without
evaluating) and appends new ones to the same file.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Callable

FORMAT = "torchslim.search/1"


@dataclasses.dataclass
class Record:
    """One evaluation: the per-group ratios evaluated (group id -> share of its atoms removed),
    what the method proposed before the ratios were scaled to the budget, what the removal
    leaves (MACs, params, predicted latency in ms under a latency budget), the score (``-inf``
    for a NaN/inf score), the seconds it took, whether it meets the budget, and a note saying
    what the method asked for (e.g. ``"group 3 at 0.5"``)."""

    index: int
    ratios: dict[int, float]
    macs: int
    params: int
    score: float
    seconds: float
    meets_budget: bool
    latency_ms: float | None = None
    proposed: dict[int, float] | None = None
    note: str = ""
    raw_score: str | None = None  # the evaluator's value when it was not finite

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["ratios"] = {str(k): v for k, v in self.ratios.items()}
        data["proposed"] = None if self.proposed is None else {str(k): v for k, v in self.proposed.items()}
        data["score"] = self.score if math.isfinite(self.score) else None
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Record":
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in fields}
        values["ratios"] = {int(k): float(v) for k, v in data["ratios"].items()}
        if data.get("proposed") is not None:
            values["proposed"] = {int(k): float(v) for k, v in data["proposed"].items()}
        values["score"] = -math.inf if data["score"] is None else float(data["score"])
        return cls(**values)


class History:
    """The records of one search, in memory and (given a ``path``) appended to a JSON-lines file."""

    def __init__(self, header: dict[str, Any], path: str | os.PathLike | None = None,
                 records: list[Record] | None = None):
        self.header = {"format": FORMAT, **header}
        self.path = Path(path) if path is not None else None
        self.records: list[Record] = list(records or [])
        self.measurements: dict[str, Any] = {}  # named measurements (timings) a resumed search replays
        if self.path is not None and not records:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._write([self.header], mode="w")

    @classmethod
    def resume(cls, path: str | os.PathLike, header: dict[str, Any]) -> "History":
        """The history in ``path``, checked to belong to the same search (method, seed, target,
        model's groups), ready to replay its records and append new ones."""
        found, records, measurements = _read_lines(path)
        expected = {"format": FORMAT, **header}
        for key, value in expected.items():
            if json.loads(json.dumps(found.get(key))) != json.loads(json.dumps(value)):
                raise ValueError(f"cannot resume from {path}: it was written by another search ({key} is "
                                 f"{found.get(key)!r} there, {value!r} here)")
        history = cls(header, path, records)
        history.measurements = measurements
        history._write([], mode="a")  # fail now, not after the next evaluation, if it cannot be appended to
        return history

    def append(self, record: Record) -> None:
        self.records.append(record)
        if self.path is not None:
            self._write([record.to_json()], mode="a")

    def measurement(self, name: str, measure: Callable[[], Any]) -> Any:
        """The value recorded under ``name`` (a resumed search gets the original run's), else
        ``measure()``, recorded: what a search decides from a timing is replayed, not re-timed."""
        if name not in self.measurements:
            self.measurements[name] = measure()
            if self.path is not None:
                self._write([{"measurement": {"name": name, "value": self.measurements[name]}}], mode="a")
        return self.measurements[name]

    def _write(self, lines: list[dict[str, Any]], mode: str) -> None:
        assert self.path is not None
        with open(self.path, mode, encoding="utf-8") as handle:
            for line in lines:
                handle.write(json.dumps(line) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def read_history(path: str | os.PathLike) -> tuple[dict[str, Any], list[Record]]:
    """(header, records) of a history file; a torn last line is dropped."""
    header, records, _ = _read_lines(path)
    return header, records


def _read_lines(path: str | os.PathLike) -> tuple[dict[str, Any], list[Record], dict[str, Any]]:
    """(header, records, measurements by name) of a history file."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    if not lines:
        raise ValueError(f"{path} is empty: not a torchslim search history")
    try:
        header = json.loads(lines[0])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not a torchslim search history (first line: {exc})") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{path} is not a torchslim search history (no format {FORMAT!r} on its first line)")
    records, measurements = [], {}
    for number, line in enumerate(lines[1:], start=2):
        try:
            data = json.loads(line)
            if isinstance(data, dict) and "measurement" in data:
                measurements[str(data["measurement"]["name"])] = data["measurement"]["value"]
                continue
            records.append(Record.from_json(data))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            if number == len(lines):  # the line being written when the search was killed
                break
            raise ValueError(f"{path}:{number}: not a search record ({exc})") from exc
    return header, records, measurements
