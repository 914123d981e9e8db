"""Run by test_distributed.py under `torchrun --nproc_per_node 2`: a Trainer whose accelerate loader dispatches
batches from the main process (``dispatch_batches=True``). Writes <out>/rank<r>.json with the error dataflex
raised at train begin (None if it trained)."""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hf_helpers import finish_distributed, make_trainer, small_dataset  # noqa: E402

from dataflex import DataFlexCallback  # noqa: E402
from dataflex.policies import Uniform  # noqa: E402


def main(out: Path) -> None:
    dfx = DataFlexCallback(Uniform(), update_every=2)
    trainer = make_trainer(
        small_dataset(), dfx, out / "run", max_steps=2, save_strategy="no",
        accelerator_config={"dispatch_batches": True},
    )  # fmt: skip
    error = None
    try:
        trainer.train()
    except NotImplementedError as err:
        error = str(err)
    (out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps({"error": error}))
    finish_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
