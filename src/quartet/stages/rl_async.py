"""Asynchronous RL: a rollout producer process samples while the trainer updates.

With `rollout.max_staleness` k the experience maker splits in two. The producer, a process of its
own with its own copy of the actor, samples step t's batch with the policy of step t-k (version
max(0, t-k): the weights after that many updates), runs the environment or tools and scores the
batch with the reward source. The trainer takes the batch, computes the old and reference
log-probs and values with its current models, the advantages, and updates; before waiting for
step t's batch it publishes its weights of version t, which the producer needs for step t+k.

The schedule is fixed, not a race: every batch is exactly min(t, k) versions old, whatever the
timing, so a run is reproducible, k = 0 gives the synchronous trainer's numbers, and a batch that
was in flight when a run stopped is made again on resume from the weights it was sampled with
(the checkpoint keeps those versions). A producer that dies, or delivers nothing within
`rollout.producer_timeout`, is named and restarted, and the batch it was making is made again
from the same weights and seeds; after `rollout.producer_restarts` failed tries the run stops
with a checkpoint of the state before the step.

The producer is a fresh interpreter (spawned, not forked: a fork would inherit the trainer's OpenMP
thread pool without its threads and hang in its first parallel region). It gets a copy of the actor,
tokenizer, reward source and prompt schedule by pickling, so reward functions must be importable
module-level functions, and a script that starts a run must guard it with `if __name__ == "__main__":`
(the producer imports the script again, as every spawned process does). It runs on CPU.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import pickle
import queue
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from quartet.config import RLConfig, RolloutConfig
from quartet.runs.distributed import Ranks
from quartet.runs.faults import StepAbandoned
from quartet.runs.run import ROLLOUT_PRODUCER
from quartet.stages.rl_experience import ExperienceMaker, SampledShare

SNAPSHOT_DIR = "rollout_producer"  # in a checkpoint: the weights the batches in flight were sampled with
_POLL_SECONDS = 0.5  # how often a waiting side checks that the other is still there
_STARTUP_SECONDS = 300.0  # a fresh producer imports torch and transformers (seconds) before its first batch


def policy_version(step: int, max_staleness: int) -> int:
    """The policy version (updates done) that samples step `step`'s batch."""
    return max(0, step - max_staleness)


def check_async(cfg: RLConfig, ranks: Ranks) -> None:
    """Refuse, before anything runs, what the rollout producer cannot do."""
    if ranks.device.type != "cpu":
        raise ValueError(f"rollout.max_staleness: the rollout producer runs on CPU only for now (this run's device "
                         f"is {ranks.device.type}); leave it unset for synchronous RL")
    if ranks.shards_parameters:
        raise ValueError("rollout.max_staleness runs on one process or with DDP: the rollout producer holds a whole "
                         "copy of the actor, which FSDP and DeepSpeed shard")
    if cfg.algorithm.dynamic_sampling and ranks.distributed:
        raise ValueError("rollout.max_staleness with algorithm.dynamic_sampling runs on one process: whether a "
                         "round has enough groups depends on every rank's scores")


class ProducerDown(StepAbandoned):
    """The rollout producer failed past its restarts: the run stops before the step, with a checkpoint."""


@dataclass
class ProducedBatch:
    """One step's batch from the producer: its sampling rounds, and what the trainer logs of them."""

    step: int
    version: int  # the policy version that sampled it
    shares: list[SampledShare]
    prompt_position: int  # prompts drawn after this batch
    timings: dict[str, float]  # the producer's generation and scoring seconds
    tool_calls: dict[str, float]  # this batch's tool calls, by tool
    waited: float = 0.0  # seconds the trainer waited for it
    restarts: int = 0  # producer restarts so far in the run

    def metrics(self, step: int) -> dict[str, float]:
        return {"offpolicy/staleness": float(step - self.version), "time/rollout_wait": self.waited,
                "rollout/producer_restarts": float(self.restarts)}


@dataclass
class _Ready:
    """The producer has started: from now on its batches are timed."""


@dataclass
class _ProducerError:
    step: int
    error: BaseException | None  # a StepAbandoned travels as itself (the run stops with a checkpoint)
    description: str  # anything else: its type, message and traceback


class RolloutProducer:
    """The trainer's handle on its rollout producer: publishes weights, waits for batches, restarts."""

    def __init__(self, maker: ExperienceMaker, rollout: RolloutConfig, note: Callable[[str], None] = print):
        if rollout.max_staleness is None:
            raise ValueError("a rollout producer needs rollout.max_staleness")
        self.maker, self.k, self.note = maker, rollout.max_staleness, note
        self.timeout, self.max_restarts = rollout.producer_timeout, rollout.producer_restarts
        self.trainer_threads = torch.get_num_threads()
        if rollout.producer_threads is not None:
            self.threads = rollout.producer_threads
        else:  # at k = 0 the two take turns: each may use every thread
            self.threads = self.trainer_threads if self.k == 0 else max(1, self.trainer_threads // 2)
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}  # version -> the actor's weights, on CPU
        self.process: Any = None
        self.ready = False  # the running producer has started (unpickled its copy, made its backend)
        self.inbox: Any = None  # weights to the producer
        self.outbox: Any = None  # batches from it
        self.restarts = 0

    # ------------------------------------------------------------------ the trainer's side

    def batch_for(self, step: int, trained: torch.nn.Module) -> ProducedBatch:
        """Publish the weights of version `step` (the trained actor's now), then wait for step `step`'s
        batch, restarting a producer that dies or stalls."""
        self.publish(step, self.maker.actor_state(trained))
        for old in [v for v in self.snapshots if v < policy_version(step, self.k)]:
            del self.snapshots[old]  # no batch to be made again needs it
        if self.process is None:
            self._start(step)
        started, tries = time.perf_counter(), 0
        while True:
            outcome = self._wait(step)
            if isinstance(outcome, ProducedBatch):
                outcome.waited, outcome.restarts = time.perf_counter() - started, self.restarts
                return outcome
            failure = outcome
            pid = self.process.pid
            self._stop()
            tries += 1
            if tries > self.max_restarts:
                raise ProducerDown(f"the rollout producer (pid {pid}) {failure} while making step {step + 1}'s "
                                   f"batch, on try {tries} of {tries} (rollout.producer_restarts = {self.max_restarts})")
            self.restarts += 1
            self.note(f"[rollout producer] pid {pid} {failure} while making step {step + 1}'s batch; restarting it "
                      f"(try {tries} of {self.max_restarts}) to make the batch again from the same weights")
            self._start(step)

    def publish(self, version: int, state: dict[str, torch.Tensor]) -> None:
        """Hand the producer the weights of `version` (kept until no batch to be made needs them)."""
        self.snapshots[version] = state
        if self.process is not None:
            self.inbox.put(("weights", version, _pack(state)))

    def in_flight_versions(self, step: int) -> list[int]:
        """Versions that sample the batches in flight after `step` updates (steps step .. step+k-1)."""
        return sorted({policy_version(s, self.k) for s in range(step, step + self.k)} - {step})

    def write_snapshots(self, directory: Path, step: int) -> None:
        """Into a checkpoint after `step` updates: the weights of the batches in flight."""
        versions = self.in_flight_versions(step)
        if versions:
            directory.mkdir(parents=True, exist_ok=True)
        for version in versions:
            save_file(self.snapshots[version], str(directory / f"version-{version}.safetensors"))

    def read_snapshots(self, directory: Path, step: int) -> None:
        """On resume at `step`: the weights of the batches that were in flight."""
        for version in self.in_flight_versions(step):
            path = directory / f"version-{version}.safetensors"
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: the checkpoint lacks the weights that sample its "
                                        f"batches in flight (rollout.max_staleness = {self.k})")
            self.snapshots[version] = load_file(str(path))

    def close(self) -> None:
        self._stop()
        torch.set_num_threads(self.trainer_threads)

    def _start(self, step: int) -> None:
        """A fresh producer making batches from step `step` on, handed every version they need."""
        try:
            payload = pickle.dumps(self.maker.producer_copy())
        except Exception as err:
            raise ValueError(f"rollout.max_staleness: the rollout producer's process gets a copy of what samples and "
                             f"scores (the actor, tokenizer, reward source) by pickling, and this run's cannot be "
                             f"pickled ({type(err).__name__}: {err}); reward functions must be importable "
                             "module-level functions") from err
        context = mp.get_context("spawn")
        self.inbox, self.outbox = context.Queue(), context.Queue()
        if self.k > 0:  # they run at once: each its share of the threads
            torch.set_num_threads(max(1, self.trainer_threads - self.threads))
        self.ready = False
        self.process = context.Process(
            target=_produce, name=ROLLOUT_PRODUCER, daemon=True,
            args=(self.inbox, self.outbox, step, self.maker.prompt_position, self.k, self.threads, os.getpid()))
        self.process.start()
        # the copy goes through the queue, not the start-up pipe: a start-up write blocks until the child
        # reads it all, and a child that dies while starting (an unguarded script, no memory) would never read
        self.inbox.put(("copy", payload))
        for version in sorted(v for v in self.snapshots if v >= policy_version(step, self.k)):
            self.inbox.put(("weights", version, _pack(self.snapshots[version])))

    def _wait(self, step: int) -> ProducedBatch | str:
        """Step `step`'s batch, or why the producer failed to deliver it (it died or stalled). The time
        limit counts from when the producer has started (a start has its own, generous, limit)."""
        deadline = time.monotonic() + (self.timeout if self.ready else _STARTUP_SECONDS)
        while True:
            try:
                item = _unpack(self.outbox.get(timeout=_POLL_SECONDS))
            except queue.Empty:
                if not self.process.is_alive():
                    return f"exited (code {self.process.exitcode})"
                if time.monotonic() > deadline:
                    if not self.ready:
                        return f"did not start in {_STARTUP_SECONDS:g} s"
                    return f"made no batch in {self.timeout:g} s (rollout.producer_timeout)"
                continue
            except Exception as err:  # a message cut short by the producer's death
                return f"sent a batch that could not be read ({type(err).__name__}: {err})"
            if isinstance(item, _Ready):
                self.ready, deadline = True, time.monotonic() + self.timeout
                continue
            if isinstance(item, _ProducerError):
                if item.error is not None:
                    raise item.error
                raise RuntimeError(f"the rollout producer failed making step {item.step + 1}'s batch:\n"
                                   f"{item.description}")
            if item.step != step or item.version != policy_version(step, self.k):
                raise RuntimeError(f"the rollout producer sent step {item.step + 1}'s batch (version {item.version}) "
                                   f"for step {step + 1}")
            return item

    def _stop(self) -> None:
        if self.process is None:
            return
        if self.process.is_alive():
            self.inbox.put(("stop",))
            self.process.join(timeout=2 * _POLL_SECONDS + 1)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        for channel in (self.inbox, self.outbox):
            channel.cancel_join_thread()  # nothing left in them is wanted
            channel.close()
        self.process = self.inbox = self.outbox = None


# ---------------------------------------------------------------------- the producer's side


def _produce(inbox: Any, outbox: Any, first_step: int, prompt_position: int, k: int, threads: int,
             trainer_pid: int) -> None:
    """The producer process: take the trainer's copy of what samples and scores; then for each step from
    `first_step`, wait for its version's weights, sample and score its batch, send it. Ends on "stop", or
    when the trainer is gone."""
    _end_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's: it checkpoints, then stops this
    torch.set_num_threads(threads)
    payload = _receive(inbox, "copy", trainer_pid)
    if payload is None:
        return
    maker: ExperienceMaker = pickle.loads(payload)  # the trainer's own pickle of its producer_copy()
    maker.become_producer(prompt_position)
    outbox.put(_pack(_Ready()))
    version = None
    for step in itertools.count(first_step):
        need = policy_version(step, k)
        if version != need:
            state = _receive(inbox, need, trainer_pid)
            if state is None:
                return
            maker.actor.load_state_dict(_unpack(state))
            version = need
        try:
            timings, tool_calls, shares = maker.produce(step)
        except StepAbandoned as err:
            outbox.put(_pack(_ProducerError(step, err, "")))
            return
        except BaseException as err:  # noqa: BLE001 - any failure is the trainer's to report
            outbox.put(_pack(_ProducerError(step, None, "".join(traceback.format_exception(err)).rstrip())))
            return
        outbox.put(_pack(ProducedBatch(step, version, shares, maker.prompt_position, timings, tool_calls)))


def _receive(inbox: Any, wanted: int | str, trainer_pid: int) -> Any:
    """The weights of version `wanted` (older ones are skipped), or with `wanted` "copy" the trainer's copy;
    None on "stop" or when the trainer is gone."""
    while True:
        try:
            message = inbox.get(timeout=_POLL_SECONDS)
        except queue.Empty:
            if os.getppid() != trainer_pid:
                return None
            continue
        if message[0] == "stop":
            return None
        if message[0] == "copy":
            if wanted == "copy":
                return message[1]
            continue
        _, got, state = message
        if got == wanted:
            return state
        if got > wanted:
            raise RuntimeError(f"rollout producer: version {got} arrived before {wanted}")


def _pack(obj: Any) -> bytes:
    """Messages cross as bytes, tensors by value: torch's own queue pickling hands tensors over as shared
    memory through file descriptors that a helper thread of the sender passes on, which failed under load."""
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def _unpack(data: bytes) -> Any:
    return pickle.loads(data)  # from this run's own processes only


def _end_with_parent() -> None:
    """Linux: the kernel ends this process when the trainer dies (a SIGKILL leaves no one to say stop)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # elsewhere the producer notices at its next wait
