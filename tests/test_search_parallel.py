"""The parallel path of the searches: Ray tasks on two local workers give the same history as
the in-process loop for the same seed, and a failing evaluation stops the search with the
records before it kept."""
from __future__ import annotations

import pytest
import torch

from test_search import WIDTHS, _net, width_score  # the same synthetic task
from torchslim.search import NetAdaptSearch, SearchInterrupted, SensitivitySearch
from torchslim.search.executors import RayExecutor

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def executor():
    with RayExecutor(workers=2) as ex:
        yield ex


def _same_records(a, b):
    assert [r.ratios for r in a] == [r.ratios for r in b]
    assert [(r.macs, r.params, r.meets_budget, r.note) for r in a] == [(r.macs, r.params, r.meets_budget, r.note)
                                                                       for r in b]
    assert [r.score for r in a] == [r.score for r in b]


def test_two_ray_workers_give_the_sequential_history(executor, tmp_path):
    model, x = _net()
    evaluate = width_score([3.0, 0.5, 2.0, 1.0])
    kwargs = dict(target_macs=0.6, seed=1, initial_cut=0.08, decay=0.9)
    sequential = NetAdaptSearch(model, x, evaluate, history=tmp_path / "seq.jsonl", **kwargs).run()
    parallel = NetAdaptSearch(model, x, evaluate, history=tmp_path / "par.jsonl", executor=executor, **kwargs).run()
    assert len(parallel.history) == len(sequential.history) > len(WIDTHS)
    _same_records(parallel.history, sequential.history)
    assert parallel.ratios == sequential.ratios and parallel.score == sequential.score


def test_ray_workers_score_the_pruned_model_not_the_original(executor):
    """The worker applies the shipped removal to its own copy: widths seen there are the candidate's."""
    model, x = _net()
    seen = SensitivitySearch(model, x, lambda m: float(sum(c.weight.shape[0] for c in m.convs)),
                             ratios=(0.25, 0.5), executor=executor).analyze()
    assert seen.baseline == sum(WIDTHS)
    for curve in seen.curves.values():
        assert curve[0] > curve[1] and all(v < sum(WIDTHS) for v in curve)


def test_a_failing_evaluation_on_a_worker_keeps_the_records_before_it(executor, tmp_path):
    model, x = _net()

    def evaluate(m):
        if m.convs[1].weight.shape[0] < WIDTHS[1]:  # every probe of the second group fails
            raise RuntimeError("out of validation data")
        return 1.0

    search = SensitivitySearch(model, x, evaluate, ratios=(0.25, 0.5), executor=executor,
                               history=tmp_path / "h.jsonl")
    with pytest.raises(SearchInterrupted, match="out of validation data") as info:
        search.analyze()
    kept = info.value.records
    assert len(kept) == 1 + 2  # the unpruned model and the first group's two probes, in order
    assert [r.note for r in kept] == ["unpruned", f"group {kept[1].note.split()[1]} at 0.25",
                                      f"group {kept[1].note.split()[1]} at 0.5"]
    assert torch.equal(model.convs[1].weight, _net()[0].convs[1].weight)  # the user's model untouched
