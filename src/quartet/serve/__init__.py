"""Serving Quartet's models over HTTP: `quartet serve reward` scores texts with a reward model.

The reward server speaks OpenRLHF's remote reward-model contract (`POST /get_reward`), so an
online-RL run here (`--models.reward_url`) or elsewhere can take its rewards from another process
or machine.
"""
