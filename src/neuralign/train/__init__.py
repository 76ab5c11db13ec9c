"""Training engine: config dataclasses, trainer with callbacks, checkpoints, plots."""
