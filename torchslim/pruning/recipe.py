"""NNI-style rule lists (YAML or JSON) turned into one typed ``PruneConfig``.

A recipe is a mapping of PruneConfig fields plus ``rules``, a list of dicts::

    criterion: l1
    round_to: 8
    rules:
      - op_types: [Conv2d]          # with op_names (globs), selects modules
        sparsity_per_layer: 0.5     # (alias: sparsity) each selected module's group loses 50%
      - op_names: ["layer4.*"]
        sparsity_per_layer: 0.7     # a later, more specific rule may refine an earlier one
      - op_names: [fc]
        exclude: true               # keep these modules' output channels
      - total_sparsity: 0.4         # or: one global budget ranked across groups
        max_sparsity_per_layer: 0.8

Rules resolve against the model's module names and types, so a rule that matches nothing
or two sparsity rules that disagree on the same module without one being more specific
fail before anything is pruned, naming ``rules[i]``.
"""
from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Any

from torch import nn

from torchslim.pruning.config import PruneConfig

_RULE_KEYS = {"op_types", "op_names", "exclude", "sparsity", "sparsity_per_layer", "total_sparsity",
              "max_sparsity_per_layer"}


def load_recipe(source: str | Path | dict[str, Any]) -> dict[str, Any]:
    """Read a recipe from a YAML/JSON file or take a dict as it is."""
    if isinstance(source, dict):
        return dict(source)
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"recipe file not found: {path}")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"recipe {path} must be a mapping with PruneConfig fields and 'rules'")
    return data


def config_from_recipe(model: nn.Module, source: str | Path | dict[str, Any], **overrides: Any) -> PruneConfig:
    """Resolve a recipe's rules against ``model`` into a PruneConfig."""
    recipe = load_recipe(source)
    rules = recipe.pop("rules", [])
    fields = {**recipe, **overrides}
    unknown = set(fields) - set(PruneConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"recipe has unknown field(s) {sorted(unknown)}; PruneConfig fields are "
                         f"{sorted(PruneConfig.__dataclass_fields__)}")
    ratios: dict[str, float] = {}
    exclude: list[str] = list(fields.pop("exclude", ()))
    selected: list[str] = []
    named: list[str] = []  # modules a sparsity rule names by op_names (not just by type)
    for i, rule in enumerate(rules):
        bad = set(rule) - _RULE_KEYS
        if bad:
            raise ValueError(f"rules[{i}] has unknown key(s) {sorted(bad)}; allowed: {sorted(_RULE_KEYS)}")
        if "total_sparsity" in rule:
            fields.update(ratio=float(rule["total_sparsity"]), global_ranking=True)
            if "max_sparsity_per_layer" in rule:
                fields["max_sparsity_per_layer"] = float(rule["max_sparsity_per_layer"])
            continue
        names = _matching(model, rule, i)
        if rule.get("exclude"):
            exclude += names
            continue
        sparsity = rule.get("sparsity_per_layer", rule.get("sparsity"))
        if sparsity is None:
            raise ValueError(f"rules[{i}] needs sparsity_per_layer (or sparsity, total_sparsity, exclude)")
        for name in names:
            ratios[name] = float(sparsity)  # later rules refine earlier ones, as in NNI
        selected += names
        if rule.get("op_names") is not None:
            named += names
    conflict = sorted(set(named) & set(exclude))
    if conflict:
        raise ValueError(f"rules conflict: {conflict[:3]} both named for pruning and excluded")
    # exclusion wins over selection by type
    ratios = {n: r for n, r in ratios.items() if n not in exclude}
    selected = [n for n in selected if n not in exclude]
    if ratios:
        fields["ratios"] = {**ratios, **fields.get("ratios", {})}
        fields.setdefault("op_names", sorted(set(selected)))
    if exclude:
        fields["exclude"] = tuple(exclude)
    return PruneConfig(**fields)


def _matching(model: nn.Module, rule: dict[str, Any], index: int) -> list[str]:
    types = set(rule.get("op_types") or [])
    patterns = rule.get("op_names")
    names = []
    for name, module in model.named_modules():
        if not name:
            continue
        if types and type(module).__name__ not in types:
            continue
        if patterns is not None and not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        if not types and patterns is None:
            continue
        names.append(name)
    if not names:
        raise ValueError(f"rules[{index}] (op_types={sorted(types) or None}, op_names={patterns}) matches no module")
    return names
