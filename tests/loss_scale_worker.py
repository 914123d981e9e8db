"""Run by test_distributed.py, under `torchrun --nproc_per_node 2` (gloo on CPU) and in one process.

One SGD step (no clipping) with ``ExampleWeightedLoss`` at uniform weights on rows that are all the same, so
every rank's batch is the same whatever the sampler gives it: the parameter change must not depend on the
number of processes. Writes <out>/rank<r>.json with the change (mode ``wrapped``; ``token``: TokenWeightedLoss
with every weight 1; ``stock``: no custom loss), or with the error a bare ``ExampleWeightedLoss`` raises across
processes (mode ``bare``). A third argument runs it on that stack of stack_worker.py (a DeepSpeed ZeRO stage, fsdp1,
fsdp2).
"""

import contextlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from datasets import Dataset  # noqa: E402
from hf_helpers import finish_distributed, tiny_model  # noqa: E402
from stack_worker import stack_args, stack_of  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from dataflex import DataFlexCallback  # noqa: E402
from dataflex.policies import Uniform  # noqa: E402
from dataflex.token_weighting import TokenWeightedLoss  # noqa: E402
from dataflex.weighting import ExampleWeightedLoss  # noqa: E402

GLOBAL_BATCH = 4


def whole_weights(trainer, stack: str):
    """A context in which the model's parameters hold its whole weights (ZeRO-3 partitions them; FSDP2's are
    DTensors, whose full_tensor() is read)."""
    if stack == "3":
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(trainer.model.parameters()), modifier_rank=None)
    if stack == "fsdp1":  # (its summon_full_params crashes the process on CPU ranks)
        raise ValueError("the parameter change is not read under fsdp1")
    return contextlib.nullcontext()


def main(out: Path, mode: str, stack: str = "ddp") -> None:
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
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    dfx = DataFlexCallback(Uniform(), update_every=100)
    loss = ExampleWeightedLoss(temperature=float("inf"))
    if mode == "token":  # every counted token weighted 1: the stock loss (TokenWeightedLoss's contract)
        loss = TokenWeightedLoss(lambda token_loss, counted, ids: counted.to(token_loss.dtype), dfx)
    settings = stack_args(stack)
    trainer_cls = settings.pop("trainer_cls", Trainer)
    args = dict(
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
    )
    args = TrainingArguments(**(args | settings))
    # (wrap_loss only for the wrapped modes: it is what lets the callback tell the loss the Trainer's factor)
    compute_loss_func = {"bare": loss, "stock": None}[mode] if mode in ("bare", "stock") else dfx.wrap_loss(loss)
    trainer = trainer_cls(
        model=model, args=args, train_dataset=ds, callbacks=[dfx], compute_loss_func=compute_loss_func
    )
    result = {"world": world}
    try:
        trainer.train()
        result["stack"] = stack_of(trainer)  # (once trained: the Trainer shards the model in train())
        with whole_weights(trainer, stack):
            after = {name: getattr(p, "full_tensor", p.detach)().detach() for name, p in model.named_parameters()}
        assert after.keys() == before.keys(), sorted(set(after) ^ set(before))
        result["change"] = sum(float((after[name] - b).abs().sum()) for name, b in before.items())
        result["trainer_scale"] = getattr(loss, "trainer_scale", None)
    except RuntimeError as error:
        result["error"] = str(error)
    rank = int(os.environ.get("RANK", "0"))
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    finish_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], *sys.argv[3:])
