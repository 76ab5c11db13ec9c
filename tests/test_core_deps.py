"""``import neuralign`` needs torch alone: the library works with every application
dependency (the ``cli`` extra) made unimportable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

APP_ONLY = ("yaml", "optuna", "matplotlib", "mnist1d", "tensorboard", "torchvision")

SCRIPT = f"""
import sys
for name in {APP_ONLY!r}:
    sys.modules[name] = None  # any import of it now fails
import torch
import neuralign as na
model = na.convert(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(),
                                       torch.nn.Linear(8, 3)), "aa")
opt = na.feedback_optimizer(model)
model(torch.randn(4, 1, 4, 4)).sum().backward()
opt.step()
print(sorted(na.metrics.weight_angles(model)))
"""


def test_the_library_needs_torch_alone():
    src = str(Path(__file__).parents[1] / "src")
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         env={"PYTHONPATH": src, "PATH": ""}, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "['0', '2']"
