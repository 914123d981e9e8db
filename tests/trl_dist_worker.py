"""Run by test_trl.py::test_sft_two_processes under torchrun (2 processes, gloo on CPU): TRL's SFTTrainer with
DataFlexCallback(ODM), uninterrupted, crashed after the step-4 checkpoint and resumed. Writes <out>/rank<r>.json.
The second argument picks TRL's batch layout: "padded" (default), "padding_free" (Llama, flattened rows) or
"group_by_length", "vision" (the tiny LLaVA with a processor and images: TRL's vision collator), "zero2" or
"zero3" (under DeepSpeed ZeRO-2 or ZeRO-3), "fsdp2" (under FSDP2: hf_helpers.FSDPOnCPU); or "kto":
KTOTrainer on unpaired preference rows."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch.distributed as dist  # noqa: E402
from hf_helpers import (  # noqa: E402
    CrashAt,
    FSDPOnCPU,
    StepRecorder,
    comparable_log,
    finish_distributed,
    small_dataset,
)
from stack_worker import ds_config, stack_args, stack_of  # noqa: E402
from test_trl import VISION_SFT, image_rows, kto_trainer, llava_processor, preference_rows, sft_trainer  # noqa: E402
from trl import SFTTrainer  # noqa: E402

from dataflex import DataFlexCallback  # noqa: E402
from dataflex.policies import ODM  # noqa: E402

STEPS, CRASH = 8, 4


LAYOUTS = {
    "padded": {},
    "padding_free": {"padding_free": True, "max_length": None, "arch": "llama"},
    "group_by_length": {"train_sampling_strategy": "group_by_length"},
    "vision": VISION_SFT,
    "zero2": {"deepspeed": ds_config(2)},  # DeepSpeed ZeRO-2 through SFTConfig(deepspeed=...)
    "zero3": {"deepspeed": ds_config(3)},  # ZeRO-3, every weight released after use (TRL's fused LM head gathers)
    # stack_worker's FSDP2 settings, with TRL's trainer under the same gate-lifting mixin
    "fsdp2": stack_args("fsdp2") | {"trainer_cls": type("FSDPOnCPUSFTTrainer", (FSDPOnCPU, SFTTrainer), {})},
}


def run(ds, out: Path, layout: str, crash_at=None, resume=None):
    dfx = DataFlexCallback(ODM(), update_every=1)
    rec = StepRecorder(dfx)
    extra = [rec] + ([CrashAt(crash_at)] if crash_at else [])
    if layout == "kto":
        settings = dict(accum=1, max_steps=STEPS, save_steps=CRASH, logging_steps=1, workers=0)
        trainer = kto_trainer(ds, dfx, out, extra=extra, model=None, **settings)
        return train(dfx, rec, trainer, resume)
    vision = {}
    if layout == "vision":
        from dataflex.testbeds.tiny import tiny_llava

        vision = {"model": tiny_llava(seed=0), "processing_class": llava_processor()}
    trainer = sft_trainer(
        ds,
        dfx,
        out,
        max_steps=STEPS,
        save_steps=CRASH,
        extra=extra,
        logging_steps=1,
        shuffle_dataset=True,
        **LAYOUTS[layout],
        **vision,
    )
    return train(dfx, rec, trainer, resume)


def train(dfx, rec, trainer, resume):
    try:
        trainer.train(resume_from_checkpoint=resume)
    except KeyboardInterrupt:
        pass
    return dfx, rec, trainer


def main(out: str, layout: str = "padded") -> None:
    if layout == "kto":
        from datasets import Dataset

        keys = ("prompt", "completion", "label", "domain")
        ds = Dataset.from_list([{k: row[k] for k in keys} for row in preference_rows(32)])  # 4 global batches
    elif layout == "vision":
        ds = image_rows(36)  # as many rows as the text layouts' dataset
    else:
        ds = small_dataset(per_domain=12)
    full, full_rec, full_tr = run(ds, Path(out) / "full", layout)
    _, head_rec, _ = run(ds, Path(out) / "crash", layout, crash_at=CRASH)
    checkpoint = str(Path(out) / "crash" / f"checkpoint-{CRASH}")
    resumed, tail_rec, res_tr = run(ds, Path(out) / "crash", layout, resume=checkpoint)
    ignore = ("num_tokens",)  # TRL restarts its own token counter on resume
    Path(out, f"rank{dist.get_rank()}.json").write_text(
        json.dumps(
            {
                "world": dist.get_world_size(),
                "stack": stack_of(full_tr),
                "orders": [full.sampler.epoch_order(e).tolist() for e in range(2)],
                "checkpointed_bf16": full_tr.args.bf16  # TRL's defaults: bf16 autocast, gradient checkpointing
                and any(getattr(m, "gradient_checkpointing", False) is True for m in full_tr.model.modules()),
                "history": full.history,
                "ids": full_rec.ids,
                "log": comparable_log(full_tr.state.log_history, ignore),
                "resumed_history": resumed.history,
                "resumed_ids": {**head_rec.ids, **tail_rec.ids},
                "resumed_log": comparable_log(res_tr.state.log_history, ignore),
            }
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
    finish_distributed()
