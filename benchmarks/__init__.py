"""Quartet's benchmarks: run each as a module from the repository root, e.g. `python -m benchmarks.ppo_step`."""
