"""Run by test_distributed.py under `torchrun --nproc_per_node 2` (gloo on CPU).

Each rank trains the same tiny GPT-2 with DataFlexCallback(ODM, embeddings) three times: uninterrupted, crashed
after the checkpoint at step 4, and resumed from that checkpoint. It writes what it saw to
<out>/rank<r>.json: weight histories, final weights and the example ids of each step. A second argument names
another model: "fused_llama" (a forward that returns the loss and no logits), "vlm" (the tiny LLaVA of
test_vlm.py on the digits VQA, embeddings taken from the images), "qwen_vl" (test_vlm.py's tiny Qwen2-VL on rows
of 0, 1 or 2 images of patches, text embeddings) or "compiled" (the GPT-2 under torch_compile, aot_eager).
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch.distributed as dist  # noqa: E402
from hf_helpers import CrashAt, StepRecorder, finish_distributed, make_trainer, small_dataset  # noqa: E402

from dataflex import DataFlexCallback  # noqa: E402
from dataflex.embeddings import EmbeddingCache  # noqa: E402
from dataflex.policies import ODM  # noqa: E402

STEPS, CRASH = 8, 4


def run(ds, out: Path, crash_at=None, resume=None, vlm=False, arch="gpt2"):
    """``arch`` "qwen_vl": the Qwen2-VL trainer of test_vlm.py (``vlm`` is for the LLaVA one)."""
    dfx = DataFlexCallback(
        ODM(),
        domains=ds["domain"],
        update_every=1,
        dynamics=True,
        embeddings=EmbeddingCache(len(ds)),
        embeddings_from="image" if vlm else "text",
    )
    rec = StepRecorder(dfx)
    extra = [rec] + ([CrashAt(crash_at)] if crash_at else [])
    if vlm:
        from test_vlm import vlm_trainer

        trainer = vlm_trainer(ds, [dfx, *extra], out, steps=STEPS, save_steps=CRASH)
    elif arch == "qwen_vl":
        from test_vlm import qwen_trainer

        trainer = qwen_trainer("Qwen2VL", ds, [dfx, *extra], out, steps=STEPS, save_steps=CRASH)
    else:
        compiled = {"torch_compile": True, "torch_compile_backend": "aot_eager"} if arch == "compiled" else {}
        arch = "gpt2" if arch == "compiled" else arch
        trainer = make_trainer(ds, dfx, out, max_steps=STEPS, save_steps=CRASH, extra=extra, arch=arch, **compiled)
    try:
        trainer.train(resume_from_checkpoint=resume)
    except KeyboardInterrupt:
        pass
    dfx.wrapped_model = type(trainer.model_wrapped).__name__
    return dfx, rec


def dynamics_digest(record) -> list:
    """Every array of the training-dynamics record, after gathering the visits still buffered."""
    record.gather()
    return [getattr(record, name).tolist() for name in ("visits", "loss_mean", "loss_m2", "margin_mean", "forgetting")]


def embeddings_digest(cache) -> list:
    """The step each example's embedding was taken at, and the embeddings (NaN, never taken, as None)."""
    return [cache.step.tolist(), [[None if v != v else round(float(v), 6) for v in row] for row in cache.values]]


def main(out: str, model: str = "gpt2") -> None:
    vlm = model == "vlm"
    if vlm:
        from dataflex.testbeds.digits import digits_vqa

        ds = digits_vqa(0.3, seed=0, fractions=(0.2, 0.1, 0.7))["train"]  # test_vlm.py's split
    elif model == "qwen_vl":
        from datasets import Dataset
        from test_vlm import qwen_example

        ds = Dataset.from_list([qwen_example(i) for i in range(36)])  # global batch 8: the run crosses an epoch
    else:
        ds = small_dataset(per_domain=12)  # 36 examples, global batch 8: the run crosses an epoch
    arch = "gpt2" if vlm else model
    full, full_rec = run(ds, Path(out) / "full", vlm=vlm, arch=arch)
    _, head_rec = run(ds, Path(out) / "crash", crash_at=CRASH, vlm=vlm, arch=arch)
    checkpoint = str(Path(out) / "crash" / f"checkpoint-{CRASH}")
    resumed, tail_rec = run(ds, Path(out) / "crash", resume=checkpoint, vlm=vlm, arch=arch)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    Path(out, f"rank{rank}.json").write_text(
        json.dumps(
            {
                "world": world,
                "wrapped_model": [full.wrapped_model, resumed.wrapped_model],
                "history": full.history,
                "weights": full.weights,
                "ids": full_rec.ids,
                "global_order": full.sampler.epoch_order(0, upto=len(ds)).tolist(),
                "resumed_history": resumed.history,
                "resumed_weights": resumed.weights,
                "resumed_ids": {**head_rec.ids, **tail_rec.ids},
                "visits": full.dynamics.visits.tolist(),
                "dynamics": dynamics_digest(full.dynamics),
                "resumed_dynamics": dynamics_digest(resumed.dynamics),
                "embeddings": embeddings_digest(full.embeddings),
                "resumed_embeddings": embeddings_digest(resumed.embeddings),
            }
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
    finish_distributed()
