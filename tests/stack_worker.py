"""Run by test_deepspeed.py and test_fsdp.py under `torchrun --nproc_per_node 2` (gloo on CPU): the Trainer with
its model sharded over the ranks. STACK is a DeepSpeed ZeRO stage (2 or 3, through TrainingArguments(deepspeed=...)),
fsdp1 or fsdp2 (TrainingArguments(fsdp=...), hf_helpers.FSDPOnCPUTrainer), or ddp (nothing sharded: the reference).
Each result file says which stack really ran (``stack``, read from the Trainer).

    torchrun ... stack_worker.py OUT STACK   uninterrupted, crashed after the step-4 checkpoint and resumed from it,
        and the finished run resumed from its final checkpoint (killed after the last save: nothing may be trained
        again). Writes <out>/rank<r>.json with the weight histories, the example ids of each step, the logged losses
        and the embedding cache (gathered from both ranks).
    torchrun ... stack_worker.py OUT STACK influence   LoRA influence selection: LESS (refused where the optimizer
        holds flattened copies, not the LoRA weights) and TracIn; writes what each did and selected.
    torchrun ... stack_worker.py OUT STACK selection   loss-focused selection (scoring passes between steps) with
        candidates that do not split evenly over the ranks; writes each rank's selections.
    torchrun ... stack_worker.py OUT STACK fused   the same Llama returning logits, then only its loss (scored from
        hidden states through the LM head); writes both runs' ids, decisions and training-dynamics record (visits,
        mean loss), and under DeepSpeed the count of LM-head gathers (or what refused the run).
    torchrun ... stack_worker.py OUT STACK curriculum   a curriculum re-scored by the current model's losses; writes the
        orders and each step's ids.
    torchrun ... stack_worker.py OUT STACK vlm   the tiny LLaVA with image embeddings, uninterrupted.
    torchrun ... stack_worker.py OUT STACK stock   the first run's crash and resume with the stock Trainer alone."""

import contextlib
import functools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch.distributed as dist  # noqa: E402
from dist_worker import embeddings_digest  # noqa: E402
from hf_helpers import (  # noqa: E402
    CrashAt,
    FSDPOnCPUTrainer,
    StepRecorder,
    comparable_log,
    finish_distributed,
    fsdp_settings,
    make_trainer,
    small_dataset,
)
from transformers import Trainer  # noqa: E402

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


#: The shard unit of each test architecture under FSDP.
FSDP_UNITS = {"gpt2": "GPT2Block", "llama": "LlamaDecoderLayer", "fused_llama": "LlamaDecoderLayer"}


def stack_args(stack: str, arch: str = "gpt2") -> dict:
    """make_trainer's arguments for STACK."""
    if stack in ("2", "3"):
        return {"deepspeed": ds_config(int(stack))}
    if stack == "fsdp1":
        # On CPU ranks FSDP1 clips each rank's shard of the gradient by that shard's own norm (the Trainer logs a
        # different grad_norm on each rank, dataflex or not), so the ranks would apply differently clipped steps.
        return {"trainer_cls": FSDPOnCPUTrainer, "max_grad_norm": 0, **fsdp_settings(1, FSDP_UNITS[arch])}
    if stack == "fsdp2":
        return {"trainer_cls": FSDPOnCPUTrainer, **fsdp_settings(2, FSDP_UNITS[arch])}
    if stack == "ddp":
        return {}
    raise ValueError(f"stack={stack!r}; valid: '2', '3' (DeepSpeed ZeRO stages), 'fsdp1', 'fsdp2', 'ddp'")


def stack_of(trainer) -> str:
    """The stack the Trainer really ran, read from it: a ZeRO stage, fsdp1/fsdp2 (its model sharded) or ddp."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    if trainer.is_deepspeed_enabled:
        return str(trainer.accelerator.state.deepspeed_plugin.zero_stage)
    if trainer.is_fsdp_enabled:
        sharded = any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in trainer.model.modules())
        return f"fsdp{trainer.accelerator.state.fsdp_plugin.fsdp_version}" if sharded else "fsdp (nothing sharded)"
    return "ddp"


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def run(ds, out: Path, stack: str, crash_at=None, resume=None):
    dfx = DataFlexCallback(ODM(), update_every=1, embeddings=EmbeddingCache(len(ds)))
    rec = StepRecorder(dfx)
    extra = [rec] + ([CrashAt(crash_at)] if crash_at else [])
    trainer = make_trainer(
        ds, dfx, out, max_steps=STEPS, save_steps=CRASH, extra=extra, logging_steps=1, **stack_args(stack)
    )
    try:
        trainer.train(resume_from_checkpoint=resume)
    except KeyboardInterrupt:
        pass
    return dfx, rec, trainer


def main(out: str, stack: str) -> None:
    ds = small_dataset(per_domain=12)
    full, full_rec, full_tr = run(ds, Path(out) / "full", stack)
    _, head_rec, _ = run(ds, Path(out) / "crash", stack, crash_at=CRASH)
    resumed, tail_rec, res_tr = run(
        ds, Path(out) / "crash", stack, resume=str(Path(out) / "crash" / f"checkpoint-{CRASH}")
    )
    again, again_rec, _ = run(ds, Path(out) / "full", stack, resume=str(Path(out) / "full" / f"checkpoint-{STEPS}"))
    Path(out, f"rank{rank()}.json").write_text(
        json.dumps(
            {
                "world": dist.get_world_size() if dist.is_initialized() else 1,
                "stack": stack_of(full_tr),
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


def curriculum(out: str, stack: str) -> None:
    """A curriculum re-scored every 2 steps by each example's loss under the current model: every rank scores the
    whole dataset (forwards outside the training step). Writes the orders decided and each step's ids."""
    import numpy as np

    from dataflex import DataFlexCurriculumCallback
    from dataflex.curriculum import Curriculum, loss_difficulty

    ds = small_dataset(per_domain=12)
    dfx = DataFlexCurriculumCallback(Curriculum(scorer=loss_difficulty(), c0=0.3), rescore_every=2)
    rec = StepRecorder(dfx)
    trainer = make_trainer(ds, dfx, Path(out), max_steps=6, save_steps=100, extra=[rec], **stack_args(stack))
    trainer.train()
    orders = [np.asarray(order).tolist() for _, order in dfx.sampler.schedule.state_dict()["events"]]
    result = {"orders": orders, "ids": rec.ids, "stack": stack_of(trainer)}
    Path(out, f"rank{rank()}.json").write_text(json.dumps(result))


def vlm(out: str, stack: str) -> None:
    """The tiny LLaVA on the digits VQA (test_vlm.py's), ODM with the training-dynamics record and image embeddings,
    its decoder and vision-encoder layers the shard units under FSDP; uninterrupted. Writes the ids, decisions,
    record and embeddings."""
    from dist_worker import dynamics_digest
    from test_vlm import vlm_trainer

    from dataflex.testbeds.digits import digits_vqa

    ds = digits_vqa(0.3, seed=0, fractions=(0.2, 0.1, 0.7))["train"]
    dfx = DataFlexCallback(
        ODM(), update_every=1, dynamics=True, embeddings=EmbeddingCache(len(ds)), embeddings_from="image"
    )
    rec = StepRecorder(dfx)
    settings = stack_args(stack, "llama")
    trainer_cls = settings.pop("trainer_cls", Trainer)
    if stack.startswith("fsdp"):
        settings["fsdp_config"]["transformer_layer_cls_to_wrap"] = ["LlamaDecoderLayer", "CLIPEncoderLayer"]
    trainer = vlm_trainer(ds, [dfx, rec], Path(out), steps=STEPS, trainer_cls=trainer_cls, settings=settings)
    trainer.train()
    digest = {"dynamics": dynamics_digest(dfx.dynamics), "embeddings": embeddings_digest(dfx.embeddings)}
    result = {"ids": rec.ids, "history": dfx.history, "stack": stack_of(trainer), **digest}
    Path(out, f"rank{rank()}.json").write_text(json.dumps(result))


def stock(out: str, stack: str) -> None:
    """:func:`main`'s crash and resume with the stock Trainer alone (no dataflex): whether the stack itself resumes
    exactly. Writes the losses logged by the uninterrupted and by the resumed run."""
    from transformers import TrainerCallback

    ds, logged = small_dataset(per_domain=12), {}
    for name, crash_at, resume in (("full", None, None), ("crash", CRASH, None), ("resumed", None, CRASH)):
        folder = Path(out) / ("full" if name == "full" else "crash")
        extra = [CrashAt(crash_at)] if crash_at else []
        trainer = make_trainer(
            ds,
            TrainerCallback(),
            folder,
            max_steps=STEPS,
            save_steps=CRASH,
            extra=extra,
            logging_steps=1,
            **stack_args(stack),
        )
        try:
            trainer.train(resume_from_checkpoint=str(folder / f"checkpoint-{resume}") if resume else None)
        except KeyboardInterrupt:
            pass
        logged[name] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result = {"stack": stack_of(trainer), "log": logged["full"], "resumed_log": logged["resumed"]}
    Path(out, f"rank{rank()}.json").write_text(json.dumps(result))


def check_identical_ranks_and_exact_resume(out: Path, stack: str, exact_resume: bool = True) -> None:
    """What the tests require of :func:`main`'s run on ``stack``: it ran sharded as asked, both ranks took the same
    decisions and logged the same losses, and (``exact_resume``) the crashed run resumed to the uninterrupted one's
    ids, decisions, logged losses and embedding cache."""
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["stack"] == r1["stack"] == stack
    assert r0["history"] == r1["history"] and len(r0["history"]) == 9
    assert r0["history"][0]["weights"] != r0["history"][-1]["weights"]
    # (FSDP1 on CPU ranks logs the norm of each rank's own shard of the gradient, also without dataflex)
    ignored = {"grad_norm"} if stack == "fsdp1" else set()
    logs = [[{k: v for k, v in h.items() if k not in ignored} for h in r["log"]] for r in (r0, r1)]
    assert logs[0] == logs[1] and any("loss" in h for h in logs[0])
    for r in (r0, r1):
        # resumed from the final checkpoint: no batch trained, no decision added (the adapter's guard)
        assert r["final_resume_ids"] == {} and r["final_resume_history"] == r["history"]
        if exact_resume:  # crash after the step-4 checkpoint and resume: ids, decisions and logged losses equal
            assert r["resumed_ids"] == r["ids"]
            assert r["resumed_history"] == r["history"]
            assert r["resumed_log"] == r["log"]
    # the embedding cache (last hidden states of the training forward) holds both ranks' examples, identically
    # on each rank (and after the resume), each from the step it last trained at
    assert r0["embeddings"] == r1["embeddings"]
    if exact_resume:
        assert r0["resumed_embeddings"] == r0["embeddings"]
    last_step = [
        max((int(s) - 1 for r in (r0, r1) for s, ids in r["ids"].items() if i in ids), default=-1)
        for i in range(len(r0["embeddings"][0]))
    ]
    assert r0["embeddings"][0] == last_step and max(last_step) == 7


def influence(out: str, stack: str) -> None:
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
        trainer = make_trainer(ds, dfx, Path(out) / mode, max_steps=4, model=model, **stack_args(stack))
        try:
            trainer.train()
            selected = [sorted(entry["ids"]) for entry in dfx.history[1:]]
            outcome[mode] = {"selections": len(selected), "selected": selected, "stack": stack_of(trainer)}
        except ValueError as error:
            outcome[mode] = {"refused": str(error)}
    # The gradient buffer is sized by the scored weights' element count, which ZeRO-3's placeholders hide.
    from dataflex.grads import lora_linears
    from dataflex.influence import GradientFeaturizer

    outcome["params_per_example"] = GradientFeaturizer(model, lora_linears(model))._params_per_example
    Path(out, f"rank{rank()}.json").write_text(json.dumps(outcome))


def selection(out: str, stack: str) -> None:
    """Loss-focused selection, whose scoring passes run the model outside the training step: 65 candidates split
    33/32 over the ranks, two batches of 32 on one rank and one on the other unless the ranks are evened out."""
    from dataflex import DataFlexSelectCallback
    from dataflex.selectors import LossFocus

    ds = small_dataset(per_domain=30).select(range(65))
    dfx = DataFlexSelectCallback(LossFocus(0.5), update_every=2, score_batch_size=32)
    rec = StepRecorder(dfx)
    trainer = make_trainer(ds, dfx, Path(out), max_steps=4, save_steps=100, extra=[rec], **stack_args(stack))
    trainer.train()
    selected = [sorted(entry["ids"]) for entry in dfx.history if "ids" in entry]
    result = {"selected": selected, "ids": rec.ids, "stack": stack_of(trainer)}
    Path(out, f"rank{rank()}.json").write_text(json.dumps(result))


def fused(out: str, stack: str) -> None:
    """The same Llama trained twice, once returning logits and once only its loss (a fused linear cross-entropy
    kernel), scored from hidden states through the LM head: under ZeRO-3 the head is gathered for it once per
    forward, under FSDP2 it is whole in the root module's forward; writes each run's ids, decisions, record and
    (under DeepSpeed) count of LM-head gathers, or what refused the run."""
    import numpy as np

    from dataflex.hf import capture

    # Logits in chunks of 5 positions: the ranks' micro-batches count different numbers of tokens, so a head whose
    # weight is gathered per call (DeepSpeed's module hooks) would run a different number of collectives on each.
    for name in ("visit_statistics", "hidden_state_positions"):
        setattr(capture, name, functools.partial(getattr(capture, name), chunk_elements=5 * 257))
    ds = small_dataset(per_domain=12)
    result = {}
    for arch in ("llama", "fused_llama"):
        dfx = DataFlexCallback(ODM(), update_every=1, dynamics=True)
        rec = StepRecorder(dfx)
        trainer = make_trainer(
            ds, dfx, Path(out) / arch, max_steps=4, save_steps=100, extra=[rec], arch=arch, **stack_args(stack, arch)
        )
        head_gathers: list[int] = []
        counting = count_gathers(trainer, head_gathers) if trainer.is_deepspeed_enabled else contextlib.nullcontext()
        try:
            with counting:
                trainer.train()
        except RuntimeError as error:
            result[arch] = {"refused": str(error)}
            continue
        dfx.dynamics.gather()
        record = {name: np.nan_to_num(getattr(dfx.dynamics, name), nan=-1).tolist() for name in ("visits", "loss_mean")}
        result[arch] = {"ids": rec.ids, "history": dfx.history, "head_gathers": len(head_gathers), **record}
        result[arch]["stack"] = stack_of(trainer)
    Path(out, f"rank{rank()}.json").write_text(json.dumps(result))


@contextlib.contextmanager
def count_gathers(trainer, seen: list[int]):
    """Count DeepSpeed's gathers of the LM head's weight in ``seen`` while training."""
    import deepspeed

    gathered, head = deepspeed.zero.GatheredParameters, trainer.model.get_output_embeddings().weight

    def counted(params, *args, **kwargs):
        seen.extend(1 for p in params if p is head)
        return gathered(params, *args, **kwargs)

    deepspeed.zero.GatheredParameters = counted
    try:
        yield
    finally:
        deepspeed.zero.GatheredParameters = gathered


if __name__ == "__main__":
    modes = {
        "influence": influence,
        "selection": selection,
        "fused": fused,
        "curriculum": curriculum,
        "vlm": vlm,
        "stock": stock,
    }
    modes.get(sys.argv[3] if len(sys.argv) > 3 else "", main)(sys.argv[1], sys.argv[2])
    finish_distributed()
