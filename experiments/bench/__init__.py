"""Performance benchmarks: the train-step and inference harness (`train_step`)."""
