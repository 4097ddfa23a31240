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
fail before anything is pruned, naming ``rules[i]``. Every error is one ``ValueError`` line
naming the recipe, the rule and the field (``recipe r.yaml: rules[0].sparsity_per_layer must
be a number in [0, 1), got 'half'``); field types are checked against PruneConfig's own
annotations before PruneConfig validates the values.
"""
from __future__ import annotations

import fnmatch
import json
import numbers
from pathlib import Path
from typing import Any, Callable

from torch import nn

from torchslim.pruning.config import PruneConfig

_RULE_KEYS = {"op_types", "op_names", "exclude", "sparsity", "sparsity_per_layer", "total_sparsity",
              "max_sparsity_per_layer"}


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_names(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)


#: PruneConfig annotation -> (check, what a valid value is): a recipe holds plain YAML/JSON values
_FIELD_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "float": (_is_number, "a number"),
    "float | None": (lambda v: v is None or _is_number(v), "a number"),
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "bool | None": (lambda v: v is None or isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "object": (lambda v: isinstance(v, str), "a name"),
    "int | str": (lambda v: isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool)),
                  "an integer or a name"),
    "int | str | None": (lambda v: v is None or isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool)),
                         "an integer or a name"),
    "Sequence[str]": (_is_names, "a list of strings"),
    "Sequence[str] | None": (lambda v: v is None or _is_names(v), "a list of strings"),
    "dict[str | int, float] | None": (lambda v: v is None or (isinstance(v, dict) and all(
        (isinstance(k, str) or (isinstance(k, int) and not isinstance(k, bool))) and _is_number(x) for k, x in v.items())),
        "a mapping of module globs to numbers"),
    "ModuleFilter | None": (lambda v: v is None, "a Python function (not available in a recipe)"),
}


def _shown(value: Any) -> str:
    return f"the string {value!r}" if isinstance(value, str) else repr(value)


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

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
            raise ValueError(f"recipe {path}: not valid YAML{where} ({getattr(exc, 'problem', None) or exc})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"recipe {path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") \
                from None
    if not isinstance(data, dict):
        raise ValueError(f"recipe {path} must be a mapping with PruneConfig fields and 'rules'")
    return data


def config_from_recipe(model: nn.Module, source: str | Path | dict[str, Any], *, defaults: dict[str, Any] | None = None,
                       **overrides: Any) -> PruneConfig:
    """Resolve a recipe's rules against ``model`` into a PruneConfig.

    ``defaults`` are PruneConfig fields the recipe may set otherwise; ``overrides`` win over it."""
    label = "recipe" if isinstance(source, dict) else f"recipe {source}"
    try:
        return _resolve(model, load_recipe(source), dict(defaults or {}), overrides)
    except ValueError as exc:
        message = str(exc)
        raise ValueError(message if message.startswith("recipe") else f"{label}: {message}") from None


def _resolve(model: nn.Module, recipe: dict[str, Any], defaults: dict[str, Any], overrides: dict[str, Any]) -> PruneConfig:
    rules = recipe.pop("rules", [])
    if not isinstance(rules, list):
        raise ValueError(f"'rules' must be a list of rules, got {_shown(rules)}")
    fields = {**defaults, **recipe, **overrides}
    unknown = set(fields) - set(PruneConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown field(s) {sorted(unknown)}; PruneConfig fields are "
                         f"{sorted(PruneConfig.__dataclass_fields__)}")
    for key in recipe:
        _check_field(key, recipe[key])
    ratios: dict[str, float] = {}
    exclude: list[str] = list(fields.pop("exclude", ()))
    selected: list[str] = []
    named: list[str] = []  # modules a sparsity rule names by op_names (not just by type)
    for i, rule in enumerate(rules):
        _check_rule(rule, i)
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


def _check_field(key: str, value: Any) -> None:
    """A top-level recipe field must have the plain type PruneConfig declares for it."""
    check = _FIELD_TYPES.get(str(PruneConfig.__dataclass_fields__[key].type))
    if check is not None and not check[0](value):
        raise ValueError(f"field '{key}' must be {check[1]}, got {_shown(value)}")


def _check_rule(rule: Any, index: int) -> None:
    """Keys and value types of ``rules[index]``; sparsities in [0, 1), a per-layer cap in (0, 1]."""
    where = f"rules[{index}]"
    if not isinstance(rule, dict):
        raise ValueError(f"{where} must be a mapping like {{op_types: [Conv2d], sparsity_per_layer: 0.5}}, "
                         f"got {_shown(rule)}")
    bad = set(rule) - _RULE_KEYS
    if bad:
        raise ValueError(f"{where} has unknown key(s) {sorted(bad)}; allowed: {sorted(_RULE_KEYS)}")
    for key in ("op_types", "op_names"):
        if key in rule and not _is_names(rule[key]):
            raise ValueError(f"{where}.{key} must be a list of strings like [{'Conv2d' if key == 'op_types' else 'layer1.*'}], "
                             f"got {_shown(rule[key])}")
    if "exclude" in rule and not isinstance(rule["exclude"], bool):
        raise ValueError(f"{where}.exclude must be true or false, got {_shown(rule['exclude'])}")
    for key in ("sparsity", "sparsity_per_layer", "total_sparsity"):
        if key in rule and not (_is_number(rule[key]) and 0 <= rule[key] < 1):
            raise ValueError(f"{where}.{key} must be a number in [0, 1), got {_shown(rule[key])}")
    cap = rule.get("max_sparsity_per_layer")
    if cap is not None and not (_is_number(cap) and 0 < cap <= 1):
        raise ValueError(f"{where}.max_sparsity_per_layer must be a number in (0, 1], got {_shown(cap)}")
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
