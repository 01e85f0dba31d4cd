"""Guess the number: a multi-turn game with feedback, a world for RL on episodes.

The environment hides a number from 1 to N (drawn from the `rng` Quartet passes, so a prompt's
samples face the same secret and every run is reproducible) and answers each guess, restating
what the player may know by now::

    user       I am thinking of a number from 1 to 7. Guess it in 4 tries.
    assistant  2
    user       Higher. It is from 3 to 7.
    assistant  6
    user       Lower. It is from 3 to 5.
    assistant  4                                    (right: the episode ends, reward 1)

The episode ends with reward 1.0 when the guess is right, or with 0.0 after T guesses; a turn
without a number in 1..N is answered with the rules and counts as a try. `turn_cost` is a reward
function charging a small cost per guess, so that among winning episodes the shorter ones score
higher. Halving the interval wins every game in at most 3 guesses (2.43 on average) for N = 7.

The SFT start copies a weak teacher (`teacher_trace`): every guess lies in the interval the
feedback gave, but half the time it is one of the interval's ends and otherwise a uniform draw (it
wins 75% of games within 4 tries, in 2.97 guesses). SFT trains every guess of a teacher's game (one
`messages` row per game). Held-out evaluation plays fresh episodes (the evaluation's own seeds); the
secrets are numbers 1..N either way, so what RL must learn is the strategy: guess nearer the middle
of what the feedback left. Everything is pure Python and deterministic given the seeds.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

N, TRIES = 7, 4
WIN_REWARD, COST_PER_GUESS = 1.0, 0.05
SEED_SFT = 8118
_NUMBER = re.compile(r"-?\d+")


def intro(n: int = N, tries: int = TRIES) -> str:
    return f"I am thinking of a number from 1 to {n}. Guess it in {tries} tries."


def feedback(higher: bool, low: int, high: int) -> str:
    """The answer to a wrong guess: its direction and the interval the secret is known to lie in."""
    return f"{'Higher' if higher else 'Lower'}. It is from {low} to {high}."


def read_guess(action: str) -> int | None:
    """The last integer in the model's turn, or None."""
    found = _NUMBER.findall(action or "")
    return int(found[-1]) if found else None


class GuessNumber:
    """One game: the secret from the episode's `rng`; `step` answers a guess (observation, reward, done)."""

    n, tries = N, TRIES

    def __init__(self, rng: random.Random):
        self.secret = rng.randint(1, self.n)
        self.low, self.high, self.guesses = 1, self.n, 0

    def reset(self) -> str:
        return intro(self.n, self.tries)

    def step(self, action: str) -> tuple[str | None, float, bool]:
        self.guesses += 1
        guess = read_guess(action)
        if guess == self.secret:
            return None, WIN_REWARD, True
        if self.guesses >= self.tries:
            return None, 0.0, True
        if guess is None or not 1 <= guess <= self.n:
            return f"Say one number from 1 to {self.n}. It is from {self.low} to {self.high}.", 0.0, False
        if guess < self.secret:
            self.low = max(self.low, guess + 1)
        else:
            self.high = min(self.high, guess - 1)
        return feedback(guess < self.secret, self.low, self.high), 0.0, False


def turn_cost(prompts: list[str], responses: list[str], messages: list[list[dict]]) -> list[float]:
    """A reward function: -COST_PER_GUESS for each of the episode's model turns."""
    return [-COST_PER_GUESS * sum(m["role"] == "assistant" for m in episode) for episode in messages]


# ---------------------------------------------------------------- the weak teacher


def teacher_guess(low: int, high: int, rng: random.Random, p_edge: float) -> int:
    """A guess inside [low, high]: one of its ends with probability `p_edge`, else a uniform draw."""
    if rng.random() < p_edge:
        return low if rng.random() < 0.5 else high
    return rng.randint(low, high)


def teacher_trace(secret: int, rng: random.Random, p_edge: float, n: int = N, tries: int = TRIES
                  ) -> list[dict[str, str]]:
    """One game of the teacher as chat messages; it ends with the teacher's last guess."""
    messages = [{"role": "user", "content": intro(n, tries)}]
    low, high = 1, n
    for turn in range(tries):
        guess = teacher_guess(low, high, rng, p_edge)
        messages.append({"role": "assistant", "content": str(guess)})
        if guess == secret or turn == tries - 1:
            break
        if guess < secret:
            low = guess + 1
        else:
            high = guess - 1
        messages.append({"role": "user", "content": feedback(guess < secret, low, high)})
    return messages


def teacher_rows(n_games: int, seed: int, p_edge: float) -> list[dict]:
    """`messages` rows of n_games teacher games, secrets uniform in 1..N."""
    rng = random.Random(seed)
    return [{"messages": teacher_trace(rng.randint(1, N), rng, p_edge)} for _ in range(n_games)]


def game_rows(n: int) -> list[dict]:
    """RL and evaluation rows: every game starts from the same rules (its secret comes from the episode's rng)."""
    return [{"prompt": [{"role": "user", "content": intro()}]} for _ in range(n)]


def won(turn_rewards: list[float]) -> bool:
    return any(r >= WIN_REWARD for r in turn_rewards)


@dataclass(frozen=True)
class GuessSettings:
    """The weak teacher and the sizes of the world's SFT start.

    The start must read the feedback before RL can sharpen its guesses: a nano start, or 300 steps of one
    row per guess, wins only 0.40-0.53 of its games (its teacher 0.75) and GRPO then moves nothing. The tiny
    start of 300 steps on whole games copies its teacher closely (0.69 won in 3.01 guesses; measured in
    docs/agents.md with what GRPO and PPO make of it).
    """

    p_edge: float = 0.5
    n_sft: int = 2000
    preset: str = "tiny"
    vocab_size: int = 320
    sft_steps: int = 300
    sft_lr: float = 3e-3
    batch_size: int = 32
    max_new_tokens: int = 4  # a guess is a number and the end of the turn
    n_eval: int = 128
