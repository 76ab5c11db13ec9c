"""Run by tests/test_lightning.py: Lightning's DDP on 2 CPU processes, each with half the
batch; each process saves its network's state dict (Lightning launches the second process by
running this script again)."""

import sys
from pathlib import Path

import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader, DistributedSampler

from neuralign.integrations.lightning import FeedbackAlignment
from test_lightning import BATCH, Classifier, _data

if __name__ == "__main__":
    out = Path(sys.argv[1])
    module = Classifier()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=2, strategy="ddp",
                        enable_progress_bar=False, enable_model_summary=False, logger=False,
                        enable_checkpointing=False, use_distributed_sampler=False,
                        callbacks=[FeedbackAlignment("aa", attr="net")])
    # (Lightning's own sampler would shuffle: the plain loop's order is the data's)
    data = _data()
    sampler = DistributedSampler(data, num_replicas=2, rank=trainer.global_rank, shuffle=False)
    trainer.fit(module, DataLoader(data, batch_size=BATCH // 2, sampler=sampler))
    torch.save(module.net.state_dict(), out / f"rank{trainer.global_rank}.pt")
