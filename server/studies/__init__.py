"""Studies: several scales, every optimizer tuned on an equal budget, speed-up over a baseline."""
