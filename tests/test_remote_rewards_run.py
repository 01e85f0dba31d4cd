"""An online-RL run scored by a reward server on loopback: a transient failure is retried and the run
goes on; a server killed mid-run stops the run with a checkpoint (exit status 3), and once the server
is back `--resume` ends with the same weights and metrics as an undisturbed run."""

import json

import torch
from safetensors.torch import load_file

from http_servers import LoopbackServer
from quartet.cli import main
from quartet.runs.checkpoint import list_checkpoints
from quartet.runs.metrics import read_metrics
from quartet.serve.reward_server import build_app

STEPS = 4


def apple_score(texts):
    return [t.count("a") / 10 - len(t) / 100 for t in texts]


def faulty(fail_from: int, fail_until: int, on_failure=None):
    """A scorer whose calls number `fail_from` up to (not including) `fail_until` raise (HTTP 500)."""
    calls = [0]

    def score(texts):
        calls[0] += 1
        if fail_from <= calls[0] - 1 < fail_until:
            if on_failure:
                on_failure()
            raise RuntimeError("the GPU fell off the bus")
        return apple_score(texts)
    score.calls = calls
    return score


def _grpo(run_dir, prompts, lm_dir, url, *extra):
    return main(["grpo", "--output", str(run_dir), "--models.actor", str(lm_dir), "--models.reward_url", url,
                 "--models.reward_retries", "1", "--models.reward_timeout", "10", "--data.train", str(prompts),
                 "--rollout.max_new_tokens", "5", "--rollout.n", "2", "--batch.rollout_batch_size", "4",
                 "--batch.mini_batch_size", "4", "--train.steps", str(STEPS), "--train.save_every", "100",
                 "--train.log_every", "1", *extra])


def _without_timings(records):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]


def test_a_server_killed_mid_run_stops_it_with_a_checkpoint_and_resume_matches_an_undisturbed_run(lm_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {i}:"}) + "\n" for i in range(6)))

    # undisturbed, apart from one failed request (step 2's), which is retried
    transient = faulty(fail_from=1, fail_until=2)
    server = LoopbackServer(build_app(transient, batch_size=8)).start()
    try:
        assert _grpo(tmp_path / "straight", prompts, lm_dir, server.url) == 0
    finally:
        server.stop()
    assert transient.calls[0] == STEPS + 1  # every step scored once, step 2 twice

    # the server dies while scoring step 3 and stays down
    down = LoopbackServer(build_app(apple_score, batch_size=8))
    dying = faulty(fail_from=2, fail_until=10**6, on_failure=lambda: setattr(down.server, "should_exit", True))
    down.app = build_app(dying, batch_size=8)
    down.start()
    try:
        status = _grpo(tmp_path / "killed", prompts, lm_dir, down.url)
    finally:
        down.stop()
    err = capsys.readouterr().err
    assert status == 3
    line = next(x for x in err.splitlines() if x.startswith("error: reward server"))
    assert f"{down.url}/get_reward failed" in line and "stopped before step 3" in line and "--resume" in line
    checkpoints = dict(list_checkpoints(tmp_path / "killed" / "checkpoints"))
    assert sorted(checkpoints) == [2]  # the state before the failed step (save_every would have written none)
    assert [r["step"] for r in read_metrics(tmp_path / "killed" / "metrics.jsonl")] == [1, 2]  # nothing of step 3

    # the server is back on the same address: the run continues where it stopped
    back = LoopbackServer(build_app(apple_score, batch_size=8), port=down.port).start()
    try:
        assert main(["grpo", "--output", str(tmp_path / "killed"), "--resume"]) == 0
    finally:
        back.stop()
    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    straight = _without_timings(read_metrics(tmp_path / "straight" / "metrics.jsonl"))
    resumed = _without_timings(read_metrics(tmp_path / "killed" / "metrics.jsonl"))
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1)) and resumed == straight
