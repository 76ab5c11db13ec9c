"""Lightning (the lightning extra): the FeedbackAlignment callback trains as the plain loop
does, with gradient accumulation, clipping, mixed precision, checkpoint resume and DDP."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import neuralign as na

L = pytest.importorskip("lightning.pytorch")
from neuralign.integrations.lightning import FeedbackAlignment  # noqa: E402

BATCH = 50


class Classifier(L.LightningModule):
    def __init__(self, lr: float = 3e-3):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(40, 32), nn.Tanh(), nn.Linear(32, 10))
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def _data(n: int = 300) -> TensorDataset:
    from neuralign.data.datasets import load_mnist1d

    d = load_mnist1d(n)
    return TensorDataset(torch.from_numpy(d["x"]), torch.from_numpy(d["y"]))


def _trainer(tmp_path, **kwargs):
    kwargs = {"max_epochs": 2, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False,
              "enable_model_summary": False, "logger": L.loggers.CSVLogger(tmp_path),
              "enable_checkpointing": False, **kwargs}
    return L.Trainer(**kwargs)


def _plain(data, rule, epochs, accumulate=1, clip=None):
    """The README's loop on the same network, data order and optimizer."""
    net = Classifier().net
    model = na.convert(net, rule, generator=torch.Generator().manual_seed(0))  # (the callback's)
    opt_w = torch.optim.Adam(na.param_groups(model)["forward"], lr=3e-3)
    opt_f = na.feedback_optimizer(model)
    batches = list(DataLoader(data, batch_size=BATCH))
    for _ in range(epochs):
        for i, (x, y) in enumerate(batches):
            (F.cross_entropy(model(x), y) / accumulate).backward()
            if (i + 1) % accumulate and i + 1 < len(batches):
                continue
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(na.param_groups(model)["forward"], clip)
            opt_w.step()
            opt_f.step()
            opt_w.zero_grad()
            opt_f.zero_grad()
    return model


def _close(module_net, plain):
    for (n, a), b in zip(module_net.state_dict().items(), plain.state_dict().values(), strict=True):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, msg=n)
        else:
            assert torch.equal(a, b), n


def test_two_epochs_on_mnist1d_equal_the_plain_loop(tmp_path):
    data = _data()
    module = Classifier()
    f0 = na.convert(module.net, "aa", generator=torch.Generator().manual_seed(0))[1].feedback
    callback = FeedbackAlignment("aa", attr="net", per_layer=True)
    _trainer(tmp_path, callbacks=[callback]).fit(module, DataLoader(data, batch_size=BATCH))
    assert isinstance(module.net[1], na.FeedbackLinear)
    assert not torch.equal(module.net[1].feedback, f0)  # F moved
    assert module.net[1].recipe_state.steps == 2 * len(DataLoader(data, batch_size=BATCH))
    _close(module.net, _plain(data, "aa", 2))
    logged = (Path(module.logger.log_dir) / "metrics.csv").read_text()
    assert "feedback/weight_angle," in logged and "feedback/weight_angle/net.1" in logged
    assert callback.recipe is None  # released at teardown


def test_accumulation_and_clipping_follow_the_optimizer_s_steps(tmp_path):
    data = _data()
    module = Classifier()
    callback = FeedbackAlignment("kp", attr="net")
    _trainer(tmp_path, max_epochs=1, accumulate_grad_batches=2, gradient_clip_val=0.5,
             callbacks=[callback]).fit(module, DataLoader(data, batch_size=BATCH))
    _close(module.net, _plain(data, "kp", 1, accumulate=2, clip=0.5))
    assert "feedback/lag" in (Path(module.logger.log_dir) / "metrics.csv").read_text()


def test_mixed_precision_trains(tmp_path):
    module = Classifier()
    f0 = na.convert(module.net, "sa", generator=torch.Generator().manual_seed(0))[3].feedback
    callback = FeedbackAlignment("sa", attr="net")
    _trainer(tmp_path, max_epochs=1, precision="bf16-mixed", callbacks=[callback]).fit(
        module, DataLoader(_data(), batch_size=BATCH))
    F3 = module.net[3].feedback
    assert F3.dtype == torch.float32 and torch.isfinite(F3).all()
    assert not torch.equal(F3, f0)


def test_fit_resumes_from_a_lightning_checkpoint_exactly(tmp_path):
    data = _data()
    loader = DataLoader(data, batch_size=BATCH)
    full = Classifier()
    _trainer(tmp_path, callbacks=[FeedbackAlignment("aa", attr="net")]).fit(full, loader)

    first = Classifier()
    ckpt = L.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _trainer(tmp_path, max_epochs=1, enable_checkpointing=True,
             callbacks=[FeedbackAlignment("aa", attr="net"), ckpt]).fit(first, loader)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert "net.1.feedback" in saved["state_dict"]
    assert "net.1.recipe_state.probe_in" in saved["state_dict"]

    resumed = Classifier()
    _trainer(tmp_path, callbacks=[FeedbackAlignment("aa", attr="net")]).fit(
        resumed, loader, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    _close(resumed.net, full.net)


@pytest.mark.slow
def test_ddp_on_two_processes_equals_one_process_on_the_global_batch(tmp_path):
    """Lightning's DDP strategy on CPU (gloo), 2 processes of half the batch: F identical on
    both, and W and F those of one process on the global batch."""
    worker = Path(__file__).parent / "_lightning_ddp.py"
    src = str(Path(__file__).parents[1] / "src")
    res = subprocess.run([sys.executable, str(worker), str(tmp_path)], capture_output=True,
                         text=True, timeout=600, cwd=tmp_path,
                         env={"PYTHONPATH": f"{src}:{Path(__file__).parent}", "PATH": "",
                              "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for k in ranks[0]:
        assert torch.equal(ranks[0][k], ranks[1][k]), k
    one = _plain(_data(), "aa", 2)  # one process, batch BATCH = 2 × 25
    for k, v in one.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(ranks[0][k], v, msg=k)
