"""Run by test_deepspeed.py under `torchrun --nproc_per_node 2` (gloo on CPU): DeepSpeed ZeRO-<stage> through
TrainingArguments(deepspeed=...), uninterrupted, crashed after the step-4 checkpoint and resumed from it, and
the finished run resumed from its final checkpoint (killed after the last save: nothing may be trained again).
Writes <out>/rank<r>.json with the weight histories, the example ids of each step, the logged losses and the
embedding cache (gathered from both ranks).

    torchrun ... ds_worker.py OUT STAGE influence   LoRA influence selection under ZeRO-STAGE: LESS (refused, the
        optimizer holds flattened copies, not the LoRA weights) and TracIn (trains); writes what each did.
    torchrun ... ds_worker.py OUT STAGE selection   loss-focused selection (scoring passes between steps) with
        candidates that do not split evenly over the ranks; writes each rank's selections.
    torchrun ... ds_worker.py OUT STAGE fused   the same Llama returning logits, then only its loss (scored from
        hidden states through the LM head); writes both runs' ids, decisions and training-dynamics record (visits,
        mean loss)."""

import functools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch.distributed as dist  # noqa: E402
from dist_worker import embeddings_digest  # noqa: E402
from hf_helpers import CrashAt, StepRecorder, comparable_log, finish_distributed, make_trainer, small_dataset  # noqa: E402

from dataflex import DataFlexCallback  # noqa: E402
from dataflex.embeddings import EmbeddingCache  # noqa: E402
from dataflex.policies import ODM  # noqa: E402

STEPS, CRASH = 8, 4


def ds_config(stage: int) -> dict:
    zero = {"stage": stage}
    if stage == 3:
        # Release every weight after its use, as for a large model: by default ZeRO-3 keeps a tiny model's weights
        # whole (under the persistence threshold, within the live-parameter budget), and no forward would gather.
        zero |= {
            "stage3_param_persistence_threshold": 0,
            "stage3_max_live_parameters": 0,
            "stage3_max_reuse_distance": 0,
            "stage3_prefetch_bucket_size": 0,
        }
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
    }


def run(ds, out: Path, stage: int, crash_at=None, resume=None):
    dfx = DataFlexCallback(ODM(), update_every=1, embeddings=EmbeddingCache(len(ds)))
    rec = StepRecorder(dfx)
    extra = [rec] + ([CrashAt(crash_at)] if crash_at else [])
    trainer = make_trainer(
        ds, dfx, out, max_steps=STEPS, save_steps=CRASH, extra=extra, logging_steps=1, deepspeed=ds_config(stage)
    )
    try:
        trainer.train(resume_from_checkpoint=resume)
    except KeyboardInterrupt:
        pass
    return dfx, rec, trainer


def main(out: str, stage: int) -> None:
    ds = small_dataset(per_domain=12)
    full, full_rec, full_tr = run(ds, Path(out) / "full", stage)
    _, head_rec, _ = run(ds, Path(out) / "crash", stage, crash_at=CRASH)
    resumed, tail_rec, res_tr = run(
        ds, Path(out) / "crash", stage, resume=str(Path(out) / "crash" / f"checkpoint-{CRASH}")
    )
    again, again_rec, _ = run(ds, Path(out) / "full", stage, resume=str(Path(out) / "full" / f"checkpoint-{STEPS}"))
    rank = dist.get_rank() if dist.is_initialized() else 0
    Path(out, f"rank{rank}.json").write_text(
        json.dumps(
            {
                "world": dist.get_world_size() if dist.is_initialized() else 1,
                "deepspeed": bool(full_tr.is_deepspeed_enabled),
                "zero_stage": full_tr.accelerator.state.deepspeed_plugin.zero_stage,
                "history": full.history,
                "ids": full_rec.ids,
                "log": comparable_log(full_tr.state.log_history),
                "resumed_history": resumed.history,
                "resumed_ids": {**head_rec.ids, **tail_rec.ids},
                "resumed_log": comparable_log(res_tr.state.log_history),
                "final_resume_ids": again_rec.ids,
                "final_resume_history": again.history,
                "embeddings": embeddings_digest(full.embeddings),
                "resumed_embeddings": embeddings_digest(resumed.embeddings),
            }
        )
    )


def influence(out: str, stage: int) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    from dataflex import DataFlexSelectCallback
    from dataflex.selectors import Influence
    from dataflex.testbeds.tiny import tiny_gpt2

    ds = small_dataset(per_domain=8)
    target = [{"input_ids": ds[i]["input_ids"]} for i in range(4)]
    outcome = {}
    for mode in ("less", "tracin"):
        torch.manual_seed(0)
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0)
        model = get_peft_model(tiny_gpt2(n_layer=1, n_embd=32, n_head=2, seed=0), lora)
        dfx = DataFlexSelectCallback(Influence(0.5, target, mode=mode), update_every=2)
        trainer = make_trainer(ds, dfx, Path(out) / mode, max_steps=4, model=model, deepspeed=ds_config(stage))
        try:
            trainer.train()
            outcome[mode] = {"selections": len(dfx.history) - 1}
        except ValueError as error:
            outcome[mode] = {"refused": str(error)}
    # The gradient buffer is sized by the scored weights' element count, which ZeRO-3's placeholders hide.
    from dataflex.grads import lora_linears
    from dataflex.influence import GradientFeaturizer

    outcome["params_per_example"] = GradientFeaturizer(model, lora_linears(model))._params_per_example
    rank = dist.get_rank() if dist.is_initialized() else 0
    Path(out, f"rank{rank}.json").write_text(json.dumps(outcome))


def selection(out: str, stage: int) -> None:
    """Loss-focused selection, whose scoring passes run the model outside the training step: 65 candidates split
    33/32 over the ranks, two batches of 32 on one rank and one on the other unless the ranks are evened out."""
    from dataflex import DataFlexSelectCallback
    from dataflex.selectors import LossFocus

    ds = small_dataset(per_domain=30).select(range(65))
    dfx = DataFlexSelectCallback(LossFocus(0.5), update_every=2, score_batch_size=32)
    rec = StepRecorder(dfx)
    trainer = make_trainer(ds, dfx, Path(out), max_steps=4, save_steps=100, extra=[rec], deepspeed=ds_config(stage))
    trainer.train()
    rank = dist.get_rank() if dist.is_initialized() else 0
    selected = [sorted(entry["ids"]) for entry in dfx.history if "ids" in entry]
    Path(out, f"rank{rank}.json").write_text(json.dumps({"selected": selected, "ids": rec.ids}))


def fused(out: str, stage: int) -> None:
    """The same Llama trained twice, once returning logits and once only its loss (a fused linear cross-entropy
    kernel): under ZeRO-3 the latter is scored from hidden states through the LM head, gathered for it once per
    forward; writes each run's ids, decisions, record and count of LM-head gathers."""
    import deepspeed
    import numpy as np

    from dataflex.hf import capture

    # Logits in chunks of 5 positions: the ranks' micro-batches count different numbers of tokens, so a head whose
    # weight is gathered per call (DeepSpeed's module hooks) would run a different number of collectives on each.
    for name in ("visit_statistics", "hidden_state_positions"):
        setattr(capture, name, functools.partial(getattr(capture, name), chunk_elements=5 * 257))
    gathered = deepspeed.zero.GatheredParameters
    ds = small_dataset(per_domain=12)
    result = {}
    for arch in ("llama", "fused_llama"):
        dfx = DataFlexCallback(ODM(), update_every=1, dynamics=True)
        rec = StepRecorder(dfx)
        trainer = make_trainer(
            ds, dfx, Path(out) / arch, max_steps=4, save_steps=100, extra=[rec], arch=arch, deepspeed=ds_config(stage)
        )
        head, head_gathers = trainer.model.get_output_embeddings().weight, []

        def counted(params, *args, head=head, seen=head_gathers, **kwargs):  # DeepSpeed's, counting LM-head gathers
            seen.extend(1 for p in params if p is head)
            return gathered(params, *args, **kwargs)

        deepspeed.zero.GatheredParameters = counted
        trainer.train()
        deepspeed.zero.GatheredParameters = gathered
        dfx.dynamics.gather()
        record = {name: np.nan_to_num(getattr(dfx.dynamics, name), nan=-1).tolist() for name in ("visits", "loss_mean")}
        result[arch] = {"ids": rec.ids, "history": dfx.history, "head_gathers": len(head_gathers), **record}
    rank = dist.get_rank() if dist.is_initialized() else 0
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    modes = {"influence": influence, "selection": selection, "fused": fused}
    modes.get(sys.argv[3] if len(sys.argv) > 3 else "", main)(sys.argv[1], int(sys.argv[2]))
    finish_distributed()
