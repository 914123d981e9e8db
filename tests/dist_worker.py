"""Run by test_distributed.py under `torchrun --nproc_per_node 2` (gloo on CPU).

Each rank trains the same tiny GPT-2 with DataFlexCallback(ODM) and writes what it saw to
<out>/rank<r>.json: the weight history, the final weights and the example ids of each step.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch.distributed as dist  # noqa: E402
from hf_helpers import StepRecorder, make_trainer, small_dataset  # noqa: E402

from dataflex import DataFlexCallback  # noqa: E402
from dataflex.policies import ODM  # noqa: E402


def main(out: str) -> None:
    ds = small_dataset()
    dfx = DataFlexCallback(ODM(), domains=ds["domain"], update_every=1)
    rec = StepRecorder(dfx)
    trainer = make_trainer(ds, dfx, Path(out) / "trainer", max_steps=8, save_steps=100, extra=[rec])
    trainer.train()
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    Path(out, f"rank{rank}.json").write_text(
        json.dumps(
            {
                "world": world,
                "history": dfx.history,
                "weights": dfx.weights,
                "ids": rec.ids,
                "global_order": dfx.sampler.epoch_order(0, upto=8 * 4 * world).tolist(),
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1])
