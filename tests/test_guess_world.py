"""The guess-the-number world: the environment (its secret from the episode's rng, its feedback, its end),
the per-guess cost, the weak teacher's games; and end to end, the world's SFT start playing held-out games
through the trainer's episodes and the arena's judge."""

import random

import pytest

from quartet.arena import guess
from quartet.envs import episode_rng


def _play(env, guesses):
    """The environment's answers to a list of guesses, until it says done."""
    assert env.reset() == guess.intro()
    out = []
    for g in guesses:
        out.append(env.step(g))
        if out[-1][2]:
            break
    return out


def test_the_secret_comes_from_the_episode_rng():
    secrets = [guess.GuessNumber(episode_rng(0, 3, row)).secret for row in range(200)]
    assert secrets == [guess.GuessNumber(episode_rng(0, 3, row)).secret for row in range(200)]
    assert set(secrets) == set(range(1, guess.N + 1))  # every number comes up
    assert secrets != [guess.GuessNumber(episode_rng(1, 3, row)).secret for row in range(200)]


def test_feedback_narrows_the_interval_and_a_right_guess_wins():
    env = guess.GuessNumber(random.Random(0))
    env.secret = 4
    steps = _play(env, ["2", "6", "I say 4"])
    assert steps[0] == ("Higher. It is from 3 to 7.", 0.0, False)
    assert steps[1] == ("Lower. It is from 3 to 5.", 0.0, False)
    assert steps[2] == (None, guess.WIN_REWARD, True)


def test_a_guess_outside_the_interval_keeps_what_is_known_and_nonsense_costs_a_try():
    env = guess.GuessNumber(random.Random(0))
    env.secret = 3
    steps = _play(env, ["5", "6", "hello", "4"])
    assert steps[0][0] == "Lower. It is from 1 to 4."
    assert steps[1][0] == "Lower. It is from 1 to 4."  # 6 > 3 tells nothing new
    assert steps[2][0] == "Say one number from 1 to 7. It is from 1 to 4."
    assert steps[3] == (None, 0.0, True)  # the fourth try was wrong: the game is lost
    assert len(steps) == guess.TRIES


def test_halving_wins_every_game_in_three_guesses():
    for secret in range(1, guess.N + 1):
        env = guess.GuessNumber(random.Random(0))
        env.secret, env_turns = secret, 0
        env.reset()
        low, high = 1, guess.N
        while True:
            env_turns += 1
            observation, reward, done = env.step(str((low + high) // 2))
            if done:
                break
            low, high = (int(x) for x in observation.rstrip(".").split("from ")[1].split(" to "))
        assert reward == guess.WIN_REWARD and env_turns <= 3


def test_turn_cost_charges_each_model_turn():
    episodes = [[{"role": "assistant", "content": "8"}],
                [{"role": "assistant", "content": "8"}, {"role": "user", "content": "Higher."},
                 {"role": "assistant", "content": "12"}]]
    assert guess.turn_cost(["", ""], ["8", "12"], episodes) == [-guess.COST_PER_GUESS, -2 * guess.COST_PER_GUESS]


def test_the_weak_teacher_guesses_inside_the_interval_and_its_games_replay_in_the_environment():
    rows = guess.teacher_rows(3000, 5, p_edge=0.7)
    assert rows == guess.teacher_rows(3000, 5, p_edge=0.7)
    rng = random.Random(5)  # teacher_rows' stream: a secret, then that game's guesses
    wins = turns = edges = 0
    for row in rows:
        secret = rng.randint(1, guess.N)
        assert guess.teacher_trace(secret, rng, 0.7) == row["messages"]
        messages = row["messages"]
        assert messages[0] == {"role": "user", "content": guess.intro()}
        assert [m["role"] for m in messages[1:]] == ["assistant", "user"] * ((len(messages) - 2) // 2) + ["assistant"]
        env = guess.GuessNumber(random.Random(0))
        env.secret, low, high = secret, 1, guess.N
        env.reset()
        for k, m in enumerate(messages[1::2]):
            g = int(m["content"])
            assert low <= g <= high  # never outside what the feedback said
            edges += g in (low, high) and low < high
            observation, reward, done = env.step(m["content"])
            if done:
                wins += reward == guess.WIN_REWARD
                assert k == len(messages[1::2]) - 1  # the trace ends where the game does
                break
            assert observation == messages[2 + 2 * k]["content"]
            low, high = env.low, env.high
        else:
            pytest.fail("a trace ended before its game did")
        turns += len(messages[1::2])
    assert 0.64 < wins / len(rows) < 0.74 and 2.9 < turns / len(rows) < 3.2  # about 69% won, in about 3.0 guesses
    assert edges / turns > 0.6


def test_game_rows_are_the_rules():
    rows = guess.game_rows(3)
    assert rows == [{"prompt": [{"role": "user", "content": guess.intro()}]}] * 3
    assert guess.read_guess("my guess: 7") == 7 and guess.read_guess("none") is None
    assert guess.won([0.0, 0.0, 1.0]) and not guess.won([0.0] * 5)


# The test's start is the world's own (tiny preset, 300 SFT steps on whole games). Measured (seed 0, 128 held-out
# games x 4 at temperature 1): it wins 0.686 of its games in 3.01 guesses; GRPO on 10,000 model tokens raised that
# to 0.797 in 2.86 guesses. The margins asserted are about half of those.
BUDGET = 10_000


def test_grpo_raises_the_held_out_win_rate_and_lowers_the_guesses(tmp_path):
    from quartet.arena.runner import TEST
    from quartet.arena.worlds import GuessWorld
    from quartet.runs.metrics import read_metrics
    from quartet.stages.rl import run_rl

    world = GuessWorld(tmp_path, 0, TEST)
    world.prepare(resume=False)
    start = world.judge(world.sft_dir)
    # the start learnt to read the feedback from its teacher: it wins far above blind guessing
    # (one random number a turn wins 1 - (6/7)^4 = 0.46 at best) and near its teacher's 0.75
    assert 0.6 < start.ground_truth < 0.8 and 2.8 < start.details["turns"] <= guess.TRIES, start
    summary = run_rl(world.rl_config("grpo", tmp_path / "grpo", BUDGET), reward_fn=world.reward_fn())
    end = world.judge(tmp_path / "grpo" / "final")
    assert BUDGET <= summary["generated_tokens"] < BUDGET + 64 * guess.TRIES * world.settings.max_new_tokens
    assert end.ground_truth >= start.ground_truth + 0.05, (start, end)
    assert end.details["turns"] <= start.details["turns"] - 0.07, (start, end)
    evals = [r for r in read_metrics(tmp_path / "grpo" / "metrics.jsonl") if world.eval_ground_truth in r]
    assert len(evals) >= 2 and all(0.0 <= r["eval/env/reward"] <= 1.0 and 1.0 <= r["eval/turns/mean"] <= guess.TRIES
                                   for r in evals)
    # the score is the environment's win reward plus the per-guess cost
    step = read_metrics(tmp_path / "grpo" / "metrics.jsonl")[1]
    assert step["score/mean"] == pytest.approx(step["env/reward"] - guess.COST_PER_GUESS * step["turns/mean"], abs=1e-5)
