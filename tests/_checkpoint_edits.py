"""Editing a saved checkpoint the way a tamperer would: change plan.json, then fix the hashes in
meta.json so that only the content checks can catch it."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path


def fix_hashes(directory: Path) -> None:
    meta = json.loads((directory / "meta.json").read_text())
    meta["weights_sha256"] = hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()
    meta["plan_sha256"] = hashlib.sha256((directory / "plan.json").read_bytes()).hexdigest()
    (directory / "meta.json").write_text(json.dumps(meta))


def rewrite_plan(directory: Path, edit) -> None:
    data = json.loads((directory / "plan.json").read_text())
    edit(data)
    (directory / "plan.json").write_text(json.dumps(data))
    fix_hashes(directory)
