"""Plain-PyTorch floors: one PPO step and one GRPO step with only the work the algorithm needs, the pace a lean
implementation can approach on the same machine (run as scripts; `benchmarks.compare` times them beside Quartet)."""
