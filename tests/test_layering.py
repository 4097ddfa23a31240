"""Layering rule: subpackages of torchslim talk to each other through public names only.

A module under ``torchslim/<pkg>/`` may import anything from its own subpackage ``<pkg>``, but
from any other subpackage it may import only public modules (no path part starting with ``_``)
and public names (not starting with ``_``). What one subpackage shares with another is therefore
documented in the owner's ``__init__`` or a public module. The top-level private modules
``torchslim/_inputs.py``, ``torchslim/_timing.py`` and ``torchslim/_registry.py`` are shared
infrastructure (input normalisation, timing, the registry type behind every extension point)
used by every subpackage and are allowed everywhere; their private names are not. Top-level modules (``torchslim/demo.py``, ...) count as their own subpackage.
"""
from __future__ import annotations

import ast
from pathlib import Path

import torchslim

ROOT = Path(torchslim.__file__).parent
SHARED_INFRASTRUCTURE = {"torchslim._inputs", "torchslim._registry", "torchslim._timing"}


def _owner(module: str) -> str:
    """The subpackage a dotted ``torchslim.x...`` name belongs to (``torchslim.x``)."""
    return ".".join(module.split(".")[:2])


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _absolute(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _private_path(module: str) -> bool:
    return module not in SHARED_INFRASTRUCTURE and any(p.startswith("_") for p in module.split(".")[1:])


def layering_violations(path: Path) -> list[str]:
    """Every private cross-subpackage import in one source file, as ``file:line: what``."""
    importer = _module_name(path)
    own = _owner(importer) if importer.count(".") >= 1 else importer
    bad = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = _absolute(node, importer, path.name == "__init__.py")
            targets = [(module, alias.name) for alias in node.names]
        else:
            continue
        for module, name in targets:
            if not module.startswith("torchslim.") or _owner(module) == own:
                continue
            if _private_path(module) or (name is not None and name.startswith("_")):
                bad.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}: {module} {name or ''}".rstrip())
    return bad


def test_no_private_imports_across_subpackages():
    bad = [v for path in sorted(ROOT.rglob("*.py")) for v in layering_violations(path)]
    assert not bad, "private cross-subpackage imports:\n" + "\n".join(bad)


def test_the_rule_catches_a_private_import(tmp_path):
    pkg = ROOT / "io"
    probe = pkg / "_layering_probe_tmp.py"
    probe.write_text("from torchslim.pruning._surgery import _get_tensor\nfrom torchslim._inputs import normalize_inputs\n")
    try:
        found = layering_violations(probe)
    finally:
        probe.unlink()
    assert len(found) == 1 and "torchslim.pruning._surgery _get_tensor" in found[0]
