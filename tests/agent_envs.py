"""Environments used by the agent tests through a dotted import path (`agent_envs:AppleRounds`)."""


class AppleRounds:
    """Two rounds of fruit: each turn earns the fraction of its words that are 'apple'; after the first turn
    the environment asks for more (a user message), after the second the episode is done."""

    rounds = 2

    def __init__(self, rng=None):
        self.turn = 0

    def reset(self, **columns):
        return None  # the dataset's prompt

    def step(self, action: str):
        self.turn += 1
        words = action.split()
        reward = sum(w == "apple" for w in words) / max(len(words), 1)
        if self.turn >= self.rounds:
            return None, reward, True
        return "More fruits:", reward, False


class SecretFruit:
    """A hidden fruit drawn from the episode's rng; the first message names how many letters it has."""

    def __init__(self, rng):
        self.secret = rng.choice(["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "plum"])

    def reset(self):
        return f"List some fruits ({len(self.secret)} letters):"

    def step(self, action: str):
        return {"observation": None, "reward": float(self.secret in action.split()), "done": True}


class Broken:
    def reset(self, **columns):
        return None

    def step(self, action: str):
        raise KeyError("no such fruit")
