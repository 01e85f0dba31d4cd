"""Rule rewards that can replace a reward model: `--models.reward_fn quartet.scoring.rules:NAME`.

Each takes `(prompts, responses)` and returns one score per response. They are examples of the
interface as much as tools: write your own verifier with the same signature.
"""

from __future__ import annotations

HAPPY_WORDS = frozenset({"happy", "smiled", "smile", "fun", "love", "loved", "laughed", "laugh", "play", "played",
                         "friends", "friend", "hug", "hugged", "nice", "good", "kind", "joy", "glad"})


def _words(text: str) -> list[str]:
    return [w.strip(".,!?;:\"'()").lower() for w in text.split()]


def happy_words(prompts: list[str], responses: list[str]) -> list[float]:
    """Five times the fraction of words that come from a small happy-story lexicon (0 for an empty response)."""
    scores = []
    for response in responses:
        words = _words(response)
        scores.append(5.0 * sum(w in HAPPY_WORDS for w in words) / len(words) if words else 0.0)
    return scores


def brevity(prompts: list[str], responses: list[str]) -> list[float]:
    """Shorter is better: minus the number of words divided by ten."""
    return [-len(r.split()) / 10.0 for r in responses]
