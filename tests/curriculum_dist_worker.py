"""Run by test_distributed.py under `torchrun --nproc_per_node 2` (gloo on CPU): a re-scored curriculum whose
scorer gives each rank other difficulties (as GPU kernels that are not deterministic, dropout left on or a random
subsample can). Writes <out>/curriculum_rank<r>.json with the orders the callback decided and each step's ids."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch.distributed as dist  # noqa: E402
from hf_helpers import StepRecorder, finish_distributed, make_trainer, small_dataset  # noqa: E402

from dataflex import DataFlexCurriculumCallback  # noqa: E402
from dataflex.curriculum import Curriculum  # noqa: E402

CALLS: list[int] = []


def rank_dependent_difficulty(model, dataset, collate) -> np.ndarray:
    CALLS.append(1)  # new draws at every scoring, other draws on every rank
    return np.random.default_rng([dist.get_rank(), len(CALLS)]).random(len(dataset))


def main(out: str) -> None:
    ds = small_dataset(per_domain=12)
    curriculum = Curriculum(scorer=rank_dependent_difficulty, pacing="linear", c0=0.3)
    dfx = DataFlexCurriculumCallback(curriculum, rescore_every=2)
    rec = StepRecorder(dfx)
    make_trainer(ds, dfx, Path(out), max_steps=6, save_steps=100, extra=[rec]).train()
    rank = dist.get_rank()
    orders = [np.asarray(order).tolist() for _, order in dfx.sampler.schedule.state_dict()["events"]]
    Path(out, f"curriculum_rank{rank}.json").write_text(json.dumps({"orders": orders, "ids": rec.ids}))


if __name__ == "__main__":
    main(sys.argv[1])
    finish_distributed()
