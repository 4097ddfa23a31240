"""Make every torchvision classification model slimmable (weights=None), run it at widths
0.25 / 0.5 / 0.75 / 1.0 and export each width: the exported model must equal the slimmable one
at that width.

Per model: the groups that narrow and those left at full width (with the first reason), the
MACs share of each width, the largest difference between the slimmable model at a width and
the model exported at that width (relative to the output's scale), and seconds. Inputs are
64x64 (224 for the ViTs, whose position embeddings fix the size, and MaxViT, whose 7x7 windows
need it; 299 for inception_v3).
Writes benchmarks/results/coverage_slimmable.json.
Usage: python benchmarks/coverage_slimmable.py [--only NAME ...] [--skip NAME ...] [--add]
(``--add --only NAME ...``: check those models, e.g. the big ones skipped by default, and keep
the rows --out holds for the others.)
"""
from __future__ import annotations

import argparse
import json
import platform
import time
import traceback
import warnings
from pathlib import Path

import torch
import torchvision
from rich.console import Console
from rich.table import Table

from torchslim.slimmable import export_width, make_slimmable

WIDTHS = (0.25, 0.5, 0.75, 1.0)
# the largest of each family (12-305 s each on one core, ~20 min in all) is left out of the default run, its
# smaller siblings (same blocks, same couplings) are not; `--add --only NAME ...` checks them
SKIP_BIG = {"vit_h_14", "vit_l_16", "vit_l_32", "vit_b_16", "regnet_y_128gf", "regnet_y_32gf", "regnet_y_16gf",
            "regnet_x_32gf", "regnet_x_16gf", "convnext_large", "convnext_base", "efficientnet_b7", "efficientnet_b6",
            "efficientnet_b5", "efficientnet_v2_l", "efficientnet_v2_m", "resnext101_64x4d", "resnext101_32x8d",
            "wide_resnet101_2", "resnet152", "swin_v2_b", "swin_b", "maxvit_t", "densenet161", "densenet201"}


def build(name: str):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    size = 224 if name.startswith(("vit", "maxvit")) else 299 if name == "inception_v3" else 64
    with torch.no_grad():  # non-trivial statistics, so a slicing mistake shows
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model, (torch.rand(1, 3, size, size),)


def check(name: str) -> dict:
    model, inputs = build(name)
    start = time.perf_counter()
    slim = make_slimmable(model, inputs, widths=WIDTHS)
    row = {"model": name, "groups": len(slim.groups), "left_out": len(slim.left_out),
           "left_out_reason": next(iter(slim.left_out.values()), None), "macs_share": {}, "max_rel_diff": 0.0}
    full = slim.macs(1.0)
    for width in WIDTHS[:-1]:
        with slim.at_width(width), torch.no_grad():
            expected = slim(*inputs)
        small = export_width(slim, width, inputs)
        with torch.no_grad():
            actual = small(*inputs)
        scale = max(1.0, expected.abs().max().item())
        row["max_rel_diff"] = max(row["max_rel_diff"], (expected - actual).abs().max().item() / scale)
        row["macs_share"][width] = slim.macs(width) / full
    row["seconds"] = time.perf_counter() - start
    row["ok"] = row["max_rel_diff"] < 1e-4
    return row


def write(out: Path, rows: list[dict], add: bool) -> None:
    """Write the rows (with ``add``, after the rows ``out`` holds for other models); the big
    models no row covers are listed as skipped."""
    names = {r["model"] for r in rows}
    kept = [r for r in json.loads(out.read_text())["rows"] if r["model"] not in names] if add and out.exists() else []
    rows = kept + rows
    covered = {r["model"] for r in rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": {"cpu": platform.processor() or platform.machine(),
                                           "torch": torch.__version__, "torchvision": torchvision.__version__},
                               "widths": WIDTHS, "ok": sum(r["ok"] for r in rows), "total": len(rows),
                               "skipped_big": sorted(SKIP_BIG - covered), "rows": rows}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--skip", nargs="*", default=[])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "coverage_slimmable.json")
    parser.add_argument("--add", action="store_true", help="keep the rows --out holds for the models not checked now")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    names = args.only or [n for n in torchvision.models.list_models(torchvision.models) if n not in SKIP_BIG]
    rows = []
    for name in names:
        if name in args.skip:
            continue
        try:
            rows.append(check(name))
        except Exception as exc:  # noqa: BLE001 - a row says what failed
            rows.append({"model": name, "ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}",
                         "trace": traceback.format_exc(limit=3)})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "trace"}), flush=True)
        write(args.out, rows, args.add)
    table = Table(title=f"slimmable coverage: {sum(r['ok'] for r in rows)}/{len(rows)} torchvision classification "
                        "models run at 0.25/0.5/0.75/1.0 and export exactly")
    for column in ("model", "ok", "groups", "left out", "MACs @0.5", "max rel diff", "s"):
        table.add_column(column, justify="right")
    for r in rows:
        if "error" in r:
            table.add_row(r["model"], "no", "-", "-", "-", r["error"][:60], "-")
        else:
            table.add_row(r["model"], "yes" if r["ok"] else "NO", str(r["groups"]), str(r["left_out"]),
                          f"{r['macs_share'][0.5]:.3f}", f"{r['max_rel_diff']:.1e}", f"{r['seconds']:.1f}")
    Console(width=140).print(table)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
