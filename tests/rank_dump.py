"""Launched by tests/test_distributed.py under torchrun: `quartet <args>` on this rank, plus a dump
of every model the stage saves as *this rank* holds it (QUARTET_TEST_RANK_DUMP/<name>-rank<r>.safetensors),
so the test can compare the ranks' parameters with each other."""

import os
import sys
from pathlib import Path

from safetensors.torch import save_file

from quartet.cli import main
from quartet.runs.run import Run

_save_final = Run.save_final


def save_final_and_dump(self, model, tokenizer, name="final", state_dict=None):
    dump = Path(os.environ["QUARTET_TEST_RANK_DUMP"])
    dump.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}  # clones untie shared tensors
    save_file(weights, str(dump / f"{name}-rank{self.ranks.rank}.safetensors"))
    return _save_final(self, model, tokenizer, name, state_dict)


Run.save_final = save_final_and_dump
sys.exit(main(sys.argv[1:]))
