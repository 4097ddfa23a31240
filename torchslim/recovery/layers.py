"""Hidden-state distillation per layer (TinyBERT, Jiao et al. 2020; Minitron, Muralidharan et
al. 2024): besides the final output, the student's intermediate outputs are pulled toward the
teacher's at mapped layers, which gives every pruned block its own training signal.

Forward hooks capture the outputs of the mapped modules of the student and of the teacher
while each runs on the same batch; :meth:`LayerDistiller.loss` is then the mean over the
mapped layers of ``||s - t||^2 / ||t||^2`` (scale-free across layers). The default mapping is
every block of the student: each child of an ``nn.ModuleList`` (transformer layers, the
blocks of most vision backbones), to the module of the same name in the teacher (pruning
keeps names). A block whose output lost channels (a pruned residual stream) is compared on
the channels it kept, read from the student's pruning history (the block's output is its
last layer's: a ``weight`` whose output rows were removed); where that cannot be read the
layer is refused by name. Outputs that are tuples (Hugging Face layers) give their first tensor.

    with LayerDistiller(student, teacher) as layers:
        out = student(**batch)
        with torch.no_grad():
            target = teacher(**batch)
        loss = task_loss(out, target) + layers.loss()
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn



def block_names(model: nn.Module) -> list[str]:
    """Every child of every ``nn.ModuleList`` of ``model``, outermost lists only, in order."""
    names: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and not any(name.startswith(f"{n}.") for n in names):
            names += [f"{name}.{child}" if name else child for child, _ in module.named_children()]
    return names


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output:
        return _first_tensor(output[0])
    value = getattr(output, "last_hidden_state", None)
    return value if isinstance(value, torch.Tensor) else None


class LayerDistiller:
    """Captures mapped student/teacher layer outputs and turns them into a loss (see the
    module docstring). ``layers``: ``"blocks"`` (default), a list of names present in both
    models, or a mapping student name -> teacher name."""

    def __init__(self, student: nn.Module, teacher: nn.Module,
                 layers: str | Sequence[str] | Mapping[str, str] = "blocks"):
        if isinstance(layers, str):
            if layers != "blocks":
                raise ValueError(f"layers must be 'blocks', a list of module names or a mapping, got {layers!r}")
            mapping = {name: name for name in block_names(student)}
        elif isinstance(layers, Mapping):
            mapping = dict(layers)
        else:
            mapping = {name: name for name in layers}
        if not mapping:
            raise ValueError(f"{type(student).__name__} has no nn.ModuleList blocks: give layers= explicitly")
        student_modules, teacher_modules = dict(student.named_modules()), dict(teacher.named_modules())
        for s_name, t_name in mapping.items():
            if s_name not in student_modules:
                raise ValueError(f"layer {s_name!r} is not a module of the student")
            if t_name not in teacher_modules:
                raise ValueError(f"layer {t_name!r} is not a module of the teacher")
        self.student, self.teacher, self.mapping = student, teacher, mapping
        self.kept = _kept_outputs(student, mapping)
        self._modules = (student_modules, teacher_modules)
        self._captured: dict[tuple[int, str], torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> "LayerDistiller":
        student_modules, teacher_modules = self._modules
        for s_name, t_name in self.mapping.items():
            self._handles.append(student_modules[s_name].register_forward_hook(self._hook(0, s_name)))
            self._handles.append(teacher_modules[t_name].register_forward_hook(self._hook(1, s_name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._captured = [], {}

    def _hook(self, side: int, name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            tensor = _first_tensor(output)
            if tensor is not None:
                self._captured[(side, name)] = tensor if side == 0 else tensor.detach()
        return hook

    def loss(self) -> torch.Tensor:
        """Mean relative squared error over the mapped layers of the last student and teacher
        forwards (both must have run since the last call); clears what it used."""
        terms = []
        for name in self.mapping:
            student, teacher = self._captured.get((0, name)), self._captured.get((1, name))
            if student is None or teacher is None:
                raise RuntimeError(f"layer {name!r} did not run in both the student and the teacher since the last "
                                   "loss(): run both forwards inside the with-block first")
            teacher = self._align(name, student, teacher)
            terms.append((student - teacher).pow(2).sum() / teacher.pow(2).sum().clamp_min(1e-12))
        self._captured = {}
        return torch.stack(terms).mean()

    def _align(self, name: str, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """The teacher's output on the student's kept channels (where the student's are fewer)."""
        if student.shape == teacher.shape:
            return teacher
        kept = self.kept.get(name)
        if kept is not None:
            dim, index = kept
            if teacher.shape[dim] > student.shape[dim]:
                aligned = teacher.index_select(dim, index.to(teacher.device))
                if aligned.shape == student.shape:
                    return aligned
        raise ValueError(f"layer {name!r}: student output {tuple(student.shape)} vs teacher {tuple(teacher.shape)}, "
                         "and its kept channels cannot be read from the pruning history; map layers whose output "
                         "keeps its width (e.g. transformer blocks) or the last layer of a pruned block")


def _kept_outputs(student: nn.Module, mapping: Mapping[str, str]) -> dict[str, tuple[int, torch.Tensor]]:
    """Per mapped layer whose output rows were pruned: (channel dim of its output, kept indices)
    from the history of the module's last ``weight`` (its own, or its last submodule's)."""
    from torchslim.pruning.plan import pruning_history  # here: recovery's training helpers run without the graph

    removed = pruning_history(student).removed
    kept: dict[str, tuple[int, torch.Tensor]] = {}
    for name in mapping:
        module = student.get_submodule(name)
        weights = [n for n, p in module.named_parameters() if n.endswith("weight") and p.ndim >= 2]
        if not weights:
            continue
        full = f"{name}.{weights[-1]}"
        gone = removed.get(full, {}).get(0)
        if not gone:
            continue
        rows = dict(module.named_parameters())[weights[-1]].shape[0] + len(gone)
        index = torch.tensor(sorted(set(range(rows)) - set(gone)), dtype=torch.long)
        owner = module.get_submodule(weights[-1].rpartition(".")[0]) if "." in weights[-1] else module
        kept[name] = (1 if isinstance(owner, nn.modules.conv._ConvNd) else -1, index)  # NC... or ...C
    return kept
