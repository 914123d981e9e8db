"""Recipe: offline selection (the LESS workflow) — score a pool once, write the chosen subset.

    python -m dataflex.recipes.select_offline checkpoint=out/checkpoint-80 \\
        target=data/instruct/validation/gsm8k.jsonl method=less fraction=0.05 out=gsm8k_less.json

``checkpoint`` is a Hugging Face Trainer checkpoint of a short LoRA warm-up run: the peft adapter, and
``optimizer.pt`` whose Adam moments precondition LESS features (Xia et al., arXiv 2402.04333). The
base model is built from the ``model`` config group (optionally with ``base_weights``). Every pool
example is scored once in length-sorted batches (``cache`` keeps partial scores across a crash), the
top ``fraction`` is kept and written with the pool's fingerprint; train on it with
``DataFlexSelectCallback``-free plain training or ``dataflex.offline.read_subset``.

Methods: ``less`` (Adam-preconditioned gradient cosine with the target's mean plain gradient),
``tracin`` (raw gradients, arXiv 2002.08484), ``loss_hard`` / ``loss_easy`` (current loss), ``random``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dataflex.domains import encode_domains
from dataflex.offline import score_pool, target_direction, token_mean_losses, write_subset
from dataflex.recipes.settings import check_model_fits, check_select_offline_settings
from dataflex.run_folder import weights_summary
from dataflex.selection import select_by_loss, select_random, select_top
from dataflex.state import DatasetFingerprint
from dataflex.testbeds.tiny import VOCAB_SIZE, collate_causal, instruct_dataset, load_jsonl_dir

METHODS = ("less", "tracin", "loss_hard", "loss_easy", "random")


def load_lora_checkpoint(base: torch.nn.Module, checkpoint: str | os.PathLike[str]) -> torch.nn.Module:
    """The peft adapter saved in a Trainer checkpoint, on top of ``base``, trainable."""
    from peft import PeftModel

    ckpt = Path(checkpoint)
    if not (ckpt / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{ckpt} holds no peft adapter (adapter_config.json); save a LoRA Trainer run there")
    return PeftModel.from_pretrained(base, str(ckpt), is_trainable=True)


def load_trainer_optimizer(model: torch.nn.Module, checkpoint: str | os.PathLike[str]) -> torch.optim.Optimizer:
    """Rebuild the Trainer's optimizer for ``model`` (same parameter groups) and load ``optimizer.pt``."""
    from transformers import Trainer, TrainingArguments

    path = Path(checkpoint) / "optimizer.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: LESS needs the warm-up run's Adam state (use method=tracin)")
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, report_to=[], use_cpu=not torch.cuda.is_available())
        optimizer = Trainer(model=model, args=args).create_optimizer()
    device = next(model.parameters()).device
    optimizer.load_state_dict(torch.load(path, map_location=device, weights_only=True))
    return optimizer


def select_offline(
    model: torch.nn.Module,
    pool: Any,
    target: Any,
    *,
    method: str,
    fraction: float,
    out: str | os.PathLike[str],
    optimizer: torch.optim.Optimizer | None = None,
    dim: int = 1024,
    seed: int = 0,
    batch_size: int = 32,
    cache: str | os.PathLike[str] | None = None,
) -> np.ndarray:
    """Score ``pool`` once with ``method``, keep the top ``fraction``, write it to ``out``; returns the ids."""
    from dataflex.grads import lora_linears
    from dataflex.influence import GradientFeaturizer

    if method not in METHODS:
        raise ValueError(f"method={method!r}; valid values are {', '.join(METHODS)}")
    scores: np.ndarray | None = None
    cached = {  # what the pool's scores depend on: a cache made from another checkpoint or method is refused
        "method": method,
        "dim": dim if method in ("less", "tracin") else None,
        "seed": seed if method in ("less", "tracin") else None,
        "weights": weights_summary(model),
    }
    if method in ("less", "tracin"):
        layers = lora_linears(model)
        featurizer = GradientFeaturizer(model, layers, dim=dim, seed=seed, mode=method, optimizer=optimizer)
        plain = GradientFeaturizer(model, layers, projector=featurizer.projector)  # LESS: plain target gradients
        direction = target_direction(
            score_pool(plain.features, target, collate_causal, batch_size=batch_size, desc="target features")
        )
        feats = score_pool(
            featurizer.features,
            pool,
            collate_causal,
            batch_size=batch_size,
            cache=cache,
            desc=f"{method} features",
            settings=cached,
        )
        scores = feats @ direction.astype(np.float32)
        ids = select_top(scores, fraction)
    elif method.startswith("loss_"):
        scores = score_pool(
            token_mean_losses(model),
            pool,
            collate_causal,
            batch_size=batch_size,
            cache=cache,
            desc="losses",
            settings=cached,
        )
        ids = select_by_loss(scores, fraction, method.removeprefix("loss_"))
    else:
        ids = select_random(len(pool), fraction, seed)
    labels = pool["task"] if "task" in pool.column_names else ["pool"] * len(pool)
    dom, names = encode_domains(labels)
    write_subset(
        out,
        ids,
        pool=DatasetFingerprint.from_labels(dom, names),
        method=method,
        fraction=fraction,
        scores=scores,
        extra={"seed": seed, "dim": dim},
    )
    return ids


def _read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _hydra_main() -> None:
    import hydra
    from hydra.utils import instantiate, to_absolute_path
    from omegaconf import DictConfig

    from dataflex.testbeds.tiny import default_data_dir

    @hydra.main(config_path="../configs", config_name="select_offline", version_base=None)
    def main(cfg: DictConfig) -> None:
        path = lambda p: to_absolute_path(p) if p else None  # noqa: E731  (relative to where it was launched)
        check_select_offline_settings(cfg, METHODS, resolve=path)
        base = instantiate(cfg.model, seed=cfg.seed)
        check_model_fits(base, max_len=cfg.max_len, vocab_needed=VOCAB_SIZE, len_key="max_len")
        if cfg.base_weights:
            base.load_state_dict(torch.load(path(cfg.base_weights), map_location="cpu", weights_only=True))
        model = load_lora_checkpoint(base, path(cfg.checkpoint))
        optimizer = load_trainer_optimizer(model, path(cfg.checkpoint)) if cfg.method == "less" else None
        pool_dir = Path(path(cfg.pool)) if cfg.pool else default_data_dir() / "instruct" / "train"
        pool = instruct_dataset(load_jsonl_dir(pool_dir), cfg.max_len)
        target = instruct_dataset(_read_jsonl(path(cfg.target)), cfg.max_len)
        ids = select_offline(
            model,
            pool,
            target,
            method=cfg.method,
            fraction=cfg.fraction,
            out=path(cfg.out),
            optimizer=optimizer,
            dim=cfg.dim,
            seed=cfg.seed,
            batch_size=cfg.batch_size,
            cache=path(cfg.cache),
        )
        tasks = np.asarray(pool["task"])[ids]
        print(f"selected {len(ids)} of {len(pool)} examples -> {path(cfg.out)}")
        for task in sorted(set(tasks.tolist())):
            print(f"  {task}: {(tasks == task).sum()}")

    main()


if __name__ == "__main__":
    _hydra_main()
