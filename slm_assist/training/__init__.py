"""The training engine: the one training loop (`Trainer`), the `Objective` interface and `Batch`, models,
DeepSpeed engine, optimizer and LR schedules, batch streams, checkpoints and metrics. Knows no recipe."""
