"""Launched by tests/test_distributed.py and tests/test_fsdp.py (under torchrun, or as one process):
`quartet <args>` on this rank, with what the tests need to see from inside the run.

- QUARTET_TEST_RANK_DUMP=DIR: every model the stage saves, as *this rank* holds it
  (DIR/<name>-rank<r>.safetensors), so the test can compare the ranks' parameters with each other.
- QUARTET_TEST_RESUME_DUMP=FILE: right after a resume from an FSDP (sharded) checkpoint, the optimizer
  state as the run restored it (gathered) and as the checkpoint holds it (read from its files on
  their own), written by the main rank to FILE, so the test can compare Adam's moments.
"""

import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from quartet.cli import main
from quartet.runs.loop import RunLoop
from quartet.runs.run import Run
from quartet.runs.sharding import SHARDED_STATE

_save_final = Run.save_final
_resume = RunLoop.resume


def save_final_and_dump(self, model, tokenizer, name="final", state_dict=None):
    dump = Path(os.environ["QUARTET_TEST_RANK_DUMP"])
    dump.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}  # clones untie shared tensors
    save_file(weights, str(dump / f"{name}-rank{self.ranks.rank}.safetensors"))
    return _save_final(self, model, tokenizer, name, state_dict)


def resume_and_dump(self, checkpoint):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    _resume(self, checkpoint)
    module, optimizer = self.job.sharded_parts()
    restored = get_optimizer_state_dict(module, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if self.ranks.is_main:
        out = Path(os.environ["QUARTET_TEST_RESUME_DUMP"])
        dcp_to_torch_save(checkpoint / SHARDED_STATE, out.with_suffix(".saved.pt"))
        saved = torch.load(out.with_suffix(".saved.pt"), weights_only=True)["optimizer"]
        torch.save({"checkpoint": str(checkpoint), "restored": restored["state"], "saved": saved["state"]}, out)


if __name__ == "__main__":  # not again in a spawned process (the rollout producer of rollout.max_staleness)
    if "QUARTET_TEST_RANK_DUMP" in os.environ:
        Run.save_final = save_final_and_dump
    if "QUARTET_TEST_RESUME_DUMP" in os.environ:
        RunLoop.resume = resume_and_dump
    sys.exit(main(sys.argv[1:]))
