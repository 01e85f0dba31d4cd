"""Quartet: RLHF with the classic four-model PPO pipeline (SFT -> reward model -> PPO)."""

__version__ = "0.1.0"
