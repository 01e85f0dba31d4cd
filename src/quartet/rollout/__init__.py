"""Rollout: generation behind one backend interface (`backend.py`); `hf` samples with the actor itself."""
