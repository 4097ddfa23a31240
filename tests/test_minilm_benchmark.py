"""benchmarks/minilm.py's long distillation, run small: length-bucketed batches hold every
sentence once, the wide text never repeats an excluded sentence, and the one-cycle schedule
trains a pruned tiny BERT toward its teacher."""
from __future__ import annotations

import copy

import pytest
import torch

from _benchmarks import load_benchmark

transformers = pytest.importorskip("transformers")
minilm = load_benchmark("minilm")


def test_length_batches_hold_every_sentence_once_in_length_order():
    texts = [f"sentence {'x' * (i * 7 % 23)} number {i}" for i in range(50)]
    batches = minilm.length_batches(texts, list, size=16)
    flat = [s for batch in batches for s in batch]
    assert sorted(flat) == sorted(texts) and [len(b) for b in batches] == [16, 16, 16, 2]
    assert [len(s) for s in flat] == sorted(len(s) for s in texts)


def test_wide_sentences_leave_out_what_they_are_told():
    wide = minilm.wide_sentences([])
    assert len(wide) > 1000 and len(set(wide)) == len(wide)
    assert not set(minilm.wide_sentences(wide[:100])) & set(wide[:100])


def _tiny_bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, vocab_size=50, max_position_embeddings=16,
                                     initializer_range=0.2)  # layers that move the hidden states
    return transformers.BertModel(config).eval()


def _gap(student, teacher, batches) -> float:
    """Mean squared difference of the final hidden states (what ``distill`` pulls together)."""
    with torch.no_grad():
        return sum(float(((student(**b).last_hidden_state - teacher(**b).last_hidden_state) ** 2).mean())
                   for b in batches) / len(batches)


@pytest.mark.parametrize("schedule", ["constant", "onecycle"])
def test_distill_brings_a_pruned_student_closer_to_its_teacher(schedule):
    import torchslim

    teacher = _tiny_bert()
    generator = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 50, (8, 12), generator=generator),
                "attention_mask": torch.ones(8, 12, dtype=torch.long)} for _ in range(6)]
    student = copy.deepcopy(teacher)
    with torch.no_grad():  # a student that starts well away from its teacher
        for parameter in student.encoder.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * parameter.std())
    torchslim.prune_(student, ((), batches[0]), torchslim.PruneConfig(ratio=0.5, exact_only=True))
    before = _gap(student, teacher, batches)
    order = [b["input_ids"].clone() for b in batches]
    minilm.distill(student, teacher, batches, epochs=4, lr=1e-3, schedule=schedule)
    assert _gap(student, teacher, batches) < 0.6 * before  # 1.82 -> 0.65 (constant), 0.89 (one-cycle)
    assert all(torch.equal(b["input_ids"], o) for b, o in zip(batches, order))  # the caller's list is not shuffled


def test_domain_text_leaves_out_scored_subjects_code_and_near_copies_of_scored_sentences():
    page = ("<h2>Car mileage</h2>\n<h3>Description</h3>\n<p>Fuel use of 32 cars measured in 1974.</p>\n"
            "<h3>Usage</h3>\n<pre>mtcars</pre>\n<h3>Source</h3>\n<p>Motor Trend, 1974.</p>\n"
            "<h3>Examples</h3>\n<pre>plot(mtcars)</pre>")
    prose = minilm.r_doc_prose(page)
    assert [p.strip() for p in prose] == ["Fuel use of 32 cars measured in 1974.", "Motor Trend, 1974."]
    assert minilm.r_doc_prose(page.replace("cars measured", "wine samples measured")) == []  # a scored subject
    scored = ["The data set contains 3 classes of 50 instances each."]
    kept = minilm.far_from(["This data set contains 3 classes of 40 cases each.",
                            "Yearly rainfall at twelve stations in the valley."], scored)
    assert kept == ["Yearly rainfall at twelve stations in the valley."]
