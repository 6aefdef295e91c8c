"""The training runner and its pieces (schedule, metric sinks, checkpoints, measurements)."""
