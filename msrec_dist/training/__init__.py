"""The training run: loop, step, evaluation, the runner."""
