"""Rule rewards used by the PPO tests through a dotted import path (`rule_rewards:apple_fraction`)."""

TARGET = "apple"


def apple_fraction(prompts: list[str], responses: list[str]) -> list[float]:
    """The fraction of words in each response that are 'apple'."""
    return [sum(w == TARGET for w in r.split()) / max(len(r.split()), 1) for r in responses]


def target_fraction(prompts: list[str], responses: list[str], target: list[str]) -> list[float]:
    """The fraction of words in each response that are the row's own `target` column (a verifiable reward)."""
    return [sum(w == t for w in r.split()) / max(len(r.split()), 1) for r, t in zip(responses, target)]


def too_few(prompts: list[str], responses: list[str]) -> list[float]:
    """Breaks the contract: one score for a whole batch."""
    return [0.0]


def first_word_is_target(prompts: list[str], responses: list[str], target: list[str]) -> list[float]:
    """A verifier: 1.0 when a response starts with the row's `target` word, else 0.0."""
    return [float(r.split()[:1] == [t]) for r, t in zip(responses, target)]


first_word_is_target.verifies = True
