"""Run by tests/test_integrations.py (not collected): AGPTrainerCallback under ``torchrun`` with
two CPU processes (gloo). Each rank writes what it saw to OUT/rank{r}.json.

    python -m torch.distributed.run --nproc_per_node 2 tests/_ddp_hf.py OUT

Both ranks train on their own batches; AGPPruner takes rank 0's choice of channels at every
mask update, so the callback's own check (sync_masks_) finds nothing to overrule.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import transformers

from _ddp_shared import TokenDataset, digest
from torchslim.integrations.hf_trainer import AGPTrainerCallback


def main() -> None:
    out = Path(sys.argv[1])
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100)
    model = transformers.BertForSequenceClassification(config)
    agp = AGPTrainerCallback(final_sparsity=0.5, start_step=0, total_steps=4, frequency=2, save_dir=out / "ckpt")
    args = transformers.TrainingArguments(output_dir=str(out / "trainer"), use_cpu=True, max_steps=6,
                                          per_device_train_batch_size=8, learning_rate=1e-3, report_to=[],
                                          save_strategy="no", disable_tqdm=True, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenDataset(), callbacks=[agp])
    trainer.train()
    rank = torch.distributed.get_rank()
    (out / f"rank{rank}.json").write_text(json.dumps({
        "world_size": torch.distributed.get_world_size(), "history": agp.history,
        "masks_differed": agp.driver.masks_differed,
        "ffn": model.bert.encoder.layer[0].intermediate.dense.out_features,
        "macs": [agp.result.macs_before, agp.result.macs_after], "digest": digest(model),
    }))


if __name__ == "__main__":
    main()
