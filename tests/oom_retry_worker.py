"""Run by test_distributed.py under `torchrun --nproc_per_node 2`: the Trainer's out-of-memory retry
(auto_find_batch_size) in 2 processes. Both ranks raise the error the Trainer recognises after step 2 (a decision
was made), the Trainer retries with a smaller per-device batch; a fresh run at that batch and a resume of the
retried run's checkpoint are made for comparison. Writes <out>/rank<r>.json."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch.distributed as dist  # noqa: E402
from hf_helpers import OutOfMemoryOnce, StepRecorder, finish_distributed, make_trainer, small_dataset  # noqa: E402

from dataflex import DataFlexCallback  # noqa: E402
from dataflex.policies import ODM  # noqa: E402


def run(ds, folder: Path, resume=None, **overrides):
    dfx = DataFlexCallback(ODM(), update_every=2)
    rec = StepRecorder(dfx)
    extra = [rec, *overrides.pop("extra", [])]
    trainer = make_trainer(ds, dfx, folder, max_steps=8, save_steps=4, extra=extra, **overrides)
    trainer.train(resume_from_checkpoint=resume)
    return dfx, rec, trainer


def main(out: str) -> None:
    ds = small_dataset(per_domain=12)
    retried, retried_rec, trainer = run(ds, Path(out) / "retried", auto_find_batch_size=True, extra=[OutOfMemoryOnce()])
    smaller = trainer._train_batch_size
    fresh, fresh_rec, _ = run(ds, Path(out) / "fresh", per_device_train_batch_size=smaller)
    checkpoint = str(Path(out) / "retried" / "checkpoint-4")
    resumed, resumed_rec, _ = run(ds, Path(out) / "retried", resume=checkpoint, per_device_train_batch_size=smaller)
    points = [(h["step"], h["effective_at"]) for h in retried.history]
    Path(out, f"rank{dist.get_rank()}.json").write_text(
        json.dumps(
            {
                "world": dist.get_world_size(),
                "smaller": smaller,
                "retried_ids": retried_rec.ids,
                "fresh_ids": fresh_rec.ids,
                "resumed_ids": resumed_rec.ids,
                "retried_points": points,
                "fresh_points": [(h["step"], h["effective_at"]) for h in fresh.history],
                "retried_history": retried.history,
                "resumed_history": resumed.history,
            }
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
    finish_distributed()
