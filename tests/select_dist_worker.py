"""Run by test_distributed.py under `torchrun --nproc_per_node 2` (gloo on CPU): influence selection.

(a) On a fixed LoRA model each rank scores half of the candidates and the scores are gathered; every
rank must end with the same subset and scores equal to one process scoring everything itself.
(b) A stock Trainer (DDP) with DataFlexSelectCallback(Influence) must make the same selections on
both ranks. Writes <out>/select_rank<r>.json.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from hf_helpers import finish_distributed, make_trainer, small_dataset  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import Trainer  # noqa: E402

from dataflex import DataFlexSelectCallback  # noqa: E402
from dataflex.grads import lora_linears  # noqa: E402
from dataflex.influence import GradientFeaturizer  # noqa: E402
from dataflex.selectors import Influence, RandomSelection, SelectionContext  # noqa: E402
from dataflex.testbeds.tiny import collate_causal, tiny_gpt2  # noqa: E402


def lora(model):
    torch.manual_seed(0)  # peft draws lora_A from the global RNG: same on every rank
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0))
    torch.manual_seed(1)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # B = 0 would make every lora_A gradient vanish
            p.data.normal_(0, 0.05)
    return peft_model


def main(out: str) -> None:
    ds = small_dataset(per_domain=12)
    target = [ds[i] for i in range(len(ds)) if ds[i]["domain"] == "code"][:4]
    # (a) direct selection on a fixed model (tracin: no optimizer state needed)
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    model = lora(tiny_gpt2(n_layer=1, n_embd=32, n_head=2, seed=0))
    selector = Influence(0.25, target, mode="tracin", dim=64, seed=3)
    ctx = SelectionContext(model=model, dataset=ds, collate=collate_causal, step=3, seed=0, batch_size=5)
    chosen = selector.select(ctx)
    ids, scores = selector.last_scores
    featurizer = GradientFeaturizer(model, lora_linears(model), dim=64, seed=3)
    direction = featurizer.features(collate_causal(target)).mean(0)
    direction = direction / direction.norm()
    local = (featurizer.features(collate_causal([ds[int(i)] for i in ids])) @ direction).numpy()
    # (b) a stock Trainer under DDP with the influence callback
    base = make_trainer(
        ds, DataFlexSelectCallback(RandomSelection(0.5)), Path(out) / "sel", max_steps=1, save_steps=100
    )
    cb = DataFlexSelectCallback(Influence(0.25, target, mode="less", dim=64), labels=ds["domain"], update_every=3)
    trainer = Trainer(
        model=lora(base.model), args=base.args, train_dataset=ds, data_collator=collate_causal, callbacks=[cb]
    )
    cb.attach(trainer)
    trainer.args.max_steps = 7
    trainer.train()
    rank = dist.get_rank()
    Path(out, f"select_rank{rank}.json").write_text(
        json.dumps(
            {
                "world": dist.get_world_size(),
                "chosen": chosen.tolist(),
                "gathered_scores": scores.tolist(),
                "local_scores": local.tolist(),
                "max_gather_vs_local": float(np.abs(scores - local).max()),
                "history": cb.history,
                "store_scores": np.nan_to_num(cb.store.score, nan=-9.0).tolist(),
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1])
    finish_distributed()
