"""Run by test_distributed.py, under `torchrun --nproc_per_node 2` (gloo on CPU) and in one process.

One SGD step (no clipping) with ``ExampleWeightedLoss`` at uniform weights on rows that are all the same, so
every rank's batch is the same whatever the sampler gives it: the parameter change must not depend on the
number of processes. Writes <out>/rank<r>.json with the change (mode ``wrapped``; ``token``: TokenWeightedLoss
with every weight 1; ``stock``: no custom loss), or with the error a bare ``ExampleWeightedLoss`` raises across
processes (mode ``bare``). A third argument runs it under DeepSpeed ZeRO of that stage.
"""

import contextlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from datasets import Dataset  # noqa: E402
from ds_worker import ds_config  # noqa: E402
from hf_helpers import finish_distributed, tiny_model  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from dataflex import DataFlexCallback  # noqa: E402
from dataflex.policies import Uniform  # noqa: E402
from dataflex.token_weighting import TokenWeightedLoss  # noqa: E402
from dataflex.weighting import ExampleWeightedLoss  # noqa: E402

GLOBAL_BATCH = 4


def main(out: Path, mode: str, zero_stage: int | None = None) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    row = list(range(3, 35))
    ds = Dataset.from_dict(
        {
            "input_ids": [row] * 32,
            "attention_mask": [[1] * len(row)] * 32,
            "labels": [row] * 32,
            "domain": ["a", "b"] * 16,
        }
    )
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    dfx = DataFlexCallback(Uniform(), update_every=100)
    loss = ExampleWeightedLoss(temperature=float("inf"))
    if mode == "token":  # every counted token weighted 1: the stock loss (TokenWeightedLoss's contract)
        loss = TokenWeightedLoss(lambda token_loss, counted, ids: counted.to(token_loss.dtype), dfx)
    args = TrainingArguments(
        output_dir=str(out / "run"),
        per_device_train_batch_size=GLOBAL_BATCH // world,
        max_steps=1,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        deepspeed=None if zero_stage is None else ds_config(zero_stage),
    )
    # (wrap_loss only for the wrapped modes: it is what lets the callback tell the loss the Trainer's factor)
    compute_loss_func = {"bare": loss, "stock": None}[mode] if mode in ("bare", "stock") else dfx.wrap_loss(loss)
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[dfx], compute_loss_func=compute_loss_func)
    result = {"world": world}
    try:
        trainer.train()
        whole = contextlib.nullcontext()
        if zero_stage == 3:  # the weights are partitioned placeholders outside a forward
            import deepspeed

            whole = deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
        with whole:
            result["change"] = sum(float((p.detach() - b).abs().sum()) for p, b in zip(model.parameters(), before))
        result["trainer_scale"] = getattr(loss, "trainer_scale", None)
    except RuntimeError as error:
        result["error"] = str(error)
    rank = int(os.environ.get("RANK", "0"))
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    finish_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else None)
