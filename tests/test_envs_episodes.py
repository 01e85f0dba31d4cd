"""Environments: the reset/step protocol in both result shapes, sync and async, their seeded rngs,
failures and time limits reported by name, the batch runner, and the built-in tool environment."""

import asyncio
import os
import subprocess
import sys
import textwrap
import time

import pytest

from quartet.envs import (
    EnvironmentFailure,
    EnvironmentTimeout,
    EpisodeRunner,
    StepResult,
    ToolBox,
    episode_rng,
    load_environment,
    render_tool_call,
    tool_environment,
)
from quartet.envs.base import step_result


class GuessNumber:
    """Guess a secret number from 1 to 100; the secret comes from the episode's rng."""

    def __init__(self, rng):
        self.secret = rng.randint(1, 100)
        self.guesses = 0

    def reset(self, hint_style: str = "plain"):
        return f"Guess my number ({hint_style})."

    def step(self, action: str):
        self.guesses += 1
        guess = int(action)
        if guess == self.secret:
            return {"observation": None, "reward": 1.0, "done": True}
        return ("higher" if guess < self.secret else "lower"), 0.0, self.guesses >= 7


class AsyncEcho:
    """Async methods; the rng arrives in reset; takes every column."""

    async def reset(self, rng, **columns):
        self.columns, self.draw = columns, rng.random()
        return None

    async def step(self, action: str):
        await asyncio.sleep(0.01)
        return StepResult(f"echo: {action}", len(action), action == "stop")


def play(runner, episodes, policy, turns=10):
    """A tiny synchronous rollout loop over the runner, as the trainer will drive it."""
    rewards = [0.0] * len(episodes)
    for _ in range(turns):
        active = [i for i, e in enumerate(episodes) if not e.done]
        if not active:
            break
        results = runner.step([episodes[i] for i in active], [policy(i) for i in active])
        for i, result in zip(active, results):
            rewards[i] += result.reward
    return rewards


def test_a_sync_env_plays_through_the_runner_in_both_result_shapes():
    with EpisodeRunner(GuessNumber, seed=3) as runner:
        episodes = runner.start(step=0, rows=[{"hint_style": "terse", "answer": 5}, {"prompt": "p"}])
        assert [e.first_message for e in episodes] == ["Guess my number (terse).", "Guess my number (plain)."]
        secrets = [e.env.secret for e in episodes]
        lows = [1] * 2
        highs = [100] * 2
        guesses = {}

        def bisect(i):
            guesses[i] = (lows[i] + highs[i]) // 2
            return str(guesses[i])

        for _ in range(7):
            active = [i for i, e in enumerate(episodes) if not e.done]
            results = runner.step([episodes[i] for i in active], [bisect(i) for i in active])
            for i, r in zip(active, results):
                if r.observation == "higher":
                    lows[i] = guesses[i] + 1
                elif r.observation == "lower":
                    highs[i] = guesses[i] - 1
                else:
                    assert r == StepResult(None, 1.0, True) and guesses[i] == secrets[i]
                    assert r.messages == []
        assert all(e.done for e in episodes)  # bisection finds 1..100 within 7 guesses
        with pytest.raises(RuntimeError, match="GuessNumber on row 0: step\\(\\) after the episode was done"):
            runner.step(episodes[:1], ["50"])


def test_an_async_env_gets_its_rng_in_reset_and_every_column():
    with EpisodeRunner(AsyncEcho, seed=1) as runner:
        rows = [{"a": 1}, {"a": 2, "name": "n", "timeout": 3, "fn": "f", "row": 7}]  # columns of any name
        episodes = runner.start(step=4, rows=rows)
        assert [e.first_message for e in episodes] == [None, None]
        assert [e.env.columns for e in episodes] == rows
        assert [e.env.draw for e in episodes] == [episode_rng(1, 4, row).random() for row in (0, 1)]
        results = runner.step(episodes, ["hi", "stop"])
        assert results == [StepResult("echo: hi", 2.0, False), StepResult("echo: stop", 4.0, True)]
        assert results[0].messages == [{"role": "user", "content": "echo: hi"}]


def test_episode_rngs_are_stable_and_distinct_and_shared_by_one_prompts_group():
    draws = {(seed, step, row): episode_rng(seed, step, row).random()
             for seed in (0, 1, 2) for step in range(20) for row in range(64)}
    assert len(set(draws.values())) == len(draws)
    assert all(episode_rng(*key).random() == value for key, value in list(draws.items())[::97])
    code = "from quartet.envs import episode_rng; print(repr(episode_rng(2, 19, 63).random()))"
    env = {**os.environ, "PYTHONHASHSEED": "123", "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert float(out) == draws[(2, 19, 63)]  # the same in another process, whatever its hash seed
    with EpisodeRunner(GuessNumber, seed=9) as runner:
        group = runner.start(step=2, rows=[{}] * 4, row_ids=[0, 0, 1, 1])
        again = runner.start(step=2, rows=[{}] * 2, row_ids=[0, 1])
        later = runner.start(step=3, rows=[{}] * 2, row_ids=[0, 1])
    secrets = [e.env.secret for e in group]
    assert secrets[0] == secrets[1] and secrets[2] == secrets[3]
    assert [e.env.secret for e in again] == secrets[::2]
    assert [e.env.secret for e in later] == [episode_rng(9, 3, r).randint(1, 100) for r in (0, 1)]


class Fragile:
    def __init__(self):
        pass

    def reset(self, row_id=None):
        if row_id == 2:
            raise KeyError("missing_column")
        return "go"

    def step(self, action):
        if action == "crash":
            return 1 / 0
        if action == "hang":
            time.sleep(5)
        if action == "bad":
            return {"observation": 3, "reward": 0.0, "done": False}
        return "ok", 0.0, False


def test_a_failing_env_is_reported_with_its_name_row_and_last_traceback_line():
    with EpisodeRunner(Fragile, name="mypkg.envs:Fragile") as runner:
        with pytest.raises(EnvironmentFailure) as info:
            runner.start(step=0, rows=[{"row_id": 0}, {"row_id": 1}, {"row_id": 2}])
        assert str(info.value) == "environment mypkg.envs:Fragile failed in reset on row 2: KeyError: 'missing_column'"
        assert isinstance(info.value.__cause__, KeyError)  # the full traceback is kept
        episodes = runner.start(step=0, rows=[{}, {}], row_ids=[10, 11])
        with pytest.raises(EnvironmentFailure, match=r"Fragile failed in step on row 11: ZeroDivisionError: division by zero"):
            runner.step(episodes, ["fine", "crash"])
        with pytest.raises(EnvironmentFailure, match=r"Fragile step\(\) on row 10 returned observation of type int"):
            runner.step(episodes[:1], ["bad"])


def test_a_hung_env_is_reported_by_name_quickly():
    with EpisodeRunner(Fragile, env_timeout=0.2) as runner:
        episodes = runner.start(step=0, rows=[{}, {}])
        started = time.perf_counter()
        with pytest.raises(EnvironmentTimeout, match=r"environment Fragile did not finish step within 0.2 s on row 1"):
            runner.step(episodes, ["fine", "hang"])
        assert time.perf_counter() - started < 2.0


@pytest.mark.parametrize("result, message", [
    ("just text", "returned str"),
    (("obs", 1.0), "returned tuple"),
    ({"observation": "o", "reward": 1.0}, "returned a dict without done"),
    (("obs", "high", False), "returned reward 'high'"),
    (("obs", 1.0, "yes"), "returned done 'yes'"),
    (([{"role": "user"}], 1.0, False), "returned observation of type list"),
])
def test_bad_step_results_are_refused_with_the_env_named(result, message):
    with pytest.raises(EnvironmentFailure, match=f"environment Env step\\(\\) on row 0 {message}"):
        step_result(result, "environment Env step() on row 0")


def test_step_results_normalise_tuples_dicts_and_message_lists():
    messages = [{"role": "tool", "content": "5"}]
    assert step_result(("x", 1, False), "e") == StepResult("x", 1.0, False)
    assert step_result({"observation": messages, "reward": True, "done": True, "info": 1}, "e") == StepResult(messages, 1.0, True)
    assert StepResult(messages, 0.0, False).messages == messages


def test_the_runner_bounds_concurrent_env_calls_and_works_inside_a_running_loop():
    counts = {"now": 0, "most": 0}

    class Slow:
        async def reset(self):
            counts["now"] += 1
            counts["most"] = max(counts["most"], counts["now"])
            await asyncio.sleep(0.02)
            counts["now"] -= 1

        def step(self, action):
            return None, 0.0, True

    async def notebook_cell():  # a caller whose own thread already runs an event loop
        with EpisodeRunner(Slow, max_concurrent=3) as runner:
            return runner.start(step=0, rows=[{}] * 10)

    assert len(asyncio.run(notebook_cell())) == 10
    assert counts["most"] == 3


def test_the_tool_environment_answers_calls_with_tool_messages_until_a_plain_answer():
    def add(a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: The first.
            b: The second.
        """
        return a + b

    def slow(seconds: float) -> str:
        """Sleep.

        Args:
            seconds: How long.
        """
        time.sleep(seconds)
        return "done"

    toolbox = ToolBox([add, slow], tool_timeout=0.2)
    with EpisodeRunner(tool_environment(toolbox)) as runner:
        episodes = runner.start(step=0, rows=[{"prompt": "What is 2+3?"}, {"prompt": "Wait"}])
        assert [e.first_message for e in episodes] == [None, None]
        turn = "Adding.\n" + render_tool_call("add", {"a": 2, "b": 3}) + render_tool_call("mul", {"a": 2})
        started = time.perf_counter()
        first = runner.step(episodes, [turn, render_tool_call("slow", {"seconds": 5})])
        assert time.perf_counter() - started < 2.0
        assert first[0].observation == [{"role": "tool", "name": "add", "content": "5"},
                                        {"role": "tool", "name": "mul",
                                         "content": "error: there is no tool named 'mul'; the tools are: add, slow"}]
        assert first[1].observation == [{"role": "tool", "name": "slow", "content": "error: slow timed out after 0.2 s"}]
        assert [(r.reward, r.done) for r in first] == [(0.0, False), (0.0, False)]
        final = runner.step(episodes, ["The answer is 5.", "<tool_call>{broken"])
        assert final[0] == StepResult(None, 0.0, True)
        assert final[1].done is False and "not closed" in final[1].observation[0]["content"]
    assert toolbox.stats.calls == {"add": 1, "slow": 1}
    assert toolbox.stats.timeouts == {"slow": 1} and toolbox.stats.malformed == 2


def test_environments_load_by_spec(tmp_path, monkeypatch):
    (tmp_path / "myenvs_q.py").write_text(textwrap.dedent('''
        class Coin:
            def __init__(self, rng):
                self.side = rng.choice(["heads", "tails"])
            def reset(self):
                return "Heads or tails?"
            def step(self, action):
                return None, float(action == self.side), True
        NOT_AN_ENV = 3
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        factory = load_environment("myenvs_q:Coin")
        with EpisodeRunner(factory, seed=5) as runner:
            episodes = runner.start(step=1, rows=[{}] * 3)
            sides = [episode_rng(5, 1, row).choice(["heads", "tails"]) for row in range(3)]
            assert [r.reward for r in runner.step(episodes, sides)] == [1.0, 1.0, 1.0]
        with pytest.raises(ValueError, match="rollout.environment 'myenvs_q:NOT_AN_ENV' is not callable"):
            load_environment("myenvs_q:NOT_AN_ENV")
        with EpisodeRunner(lambda: object(), name="broken") as runner:
            with pytest.raises(EnvironmentFailure, match=r"environment broken has no reset\(\) method"):
                runner.start(step=0, rows=[{}])
    finally:
        sys.modules.pop("myenvs_q", None)


def test_the_envs_package_imports_without_the_model_stack():
    code = "import sys, quartet.envs; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip() == "[]"
