"""DoReMi's proxy training (arXiv 2305.10429), offline and online; the update rule is in ``dataflex.policies.doremi``.

Offline: reference model -> Group-DRO proxy -> exported domain weights. Stages, each skipped when its
output already exists and each resumable mid-way from its checkpoint:

1. ``reference/``: a model trained on a fixed mixture (uniform or natural) -> ``model.pt``.
2. ``reference/reference_losses.npy``: the reference's per-token losses on every training example, so the
   proxy stage never runs the reference again (``NaN`` marks tokens that do not count). Kept in the
   reference's folder so they go with it: a reference retrained after that folder was deleted is never paired
   with the old one's losses.
3. ``proxy/``: the proxy trained with Group DRO (:class:`GroupDROObjective`) on batches drawn from the
   reference mixture -> ``doremi_weights.json`` with the averaged weights and their trajectory.

The main run then reads the weights with :func:`load_doremi_weights` and trains with
``Static(weights)``, or uses :class:`DoReMiOffline` (``policy=doremi`` in ``configs/mixture.yaml``).

Online (:class:`DoReMiOnline`, not in the paper's code): a proxy and a frozen reference step on the
main run's own micro-batches and their live weights drive the main sampler;
:class:`PreparedDoReMiOnline` trains its reference first (``policy=doremi_online``).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from dataflex import dist
from dataflex.accelerator import changed_numerics
from dataflex.checks import flag, real_number, whole_number
from dataflex.losses import IGNORE_INDEX, token_cross_entropy
from dataflex.modes import eval_mode
from dataflex.policies.base import BoundPolicy
from dataflex.policies.doremi import GroupDROWeights, checked_dro_settings
from dataflex.policies.static import Natural, Uniform
from dataflex.proxies.loop import LoopResult, train_mixture
from dataflex.run_folder import claim_run_folder, weights_summary
from dataflex.state import DatasetFingerprint, open_checked, read_json, token_digest, write_checked, write_json_atomic
from dataflex.store import DomainStats
from dataflex.weights import apply_floor, validate_weights

__all__ = [
    "DoReMiOffline",
    "DoReMiOnline",
    "GroupDROObjective",
    "PreparedDoReMiOnline",
    "WEIGHTS_FILE",
    "load_doremi_weights",
    "reference_token_losses",
    "run_doremi_offline",
    "train_proxy",
    "train_reference",
]

WEIGHTS_FILE = "doremi_weights.json"


@torch.no_grad()
def reference_token_losses(
    model: torch.nn.Module,
    dataset: Any,
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]],
    batch_size: int = 64,
) -> np.ndarray:
    """Per-token loss of ``model`` on every example: ``(N, max_len - 1)`` float32, NaN where not counted."""
    device = next(model.parameters()).device
    width = max(len(x) for x in dataset["input_ids"]) - 1
    out = np.full((len(dataset), width), np.nan, dtype=np.float32)
    with eval_mode(model):
        for start in range(0, len(dataset), batch_size):
            rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = {k: v.to(device) for k, v in collate(rows).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            tok = token_cross_entropy(logits, batch["labels"]).cpu().numpy()
            counted = (batch["labels"][:, 1:] != IGNORE_INDEX).cpu().numpy()
            tok[~counted] = np.nan
            out[start : start + len(rows), : tok.shape[1]] = tok
    return out


class GroupDROObjective:
    """The proxy's loss: alpha-weighted per-domain loss, with alpha moved by DoReMi's update each step.

    Reference per-token losses come from the cache (looked up by example id), so the reference model
    is not needed while the proxy trains.
    """

    def __init__(self, ref_losses: np.ndarray, num_domains: int, eta: float = 1.0, smoothing: float = 1e-3) -> None:
        self.ref_losses = ref_losses
        self.dro = GroupDROWeights(num_domains, eta, smoothing, keep_trajectory=True)

    def __call__(self, model, batch, ids, row_domain):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        proxy_tok = token_cross_entropy(out.logits, batch["labels"])
        ref = np.nan_to_num(self.ref_losses[ids, : proxy_tok.shape[1]], nan=0.0)
        ref_tok = torch.as_tensor(ref, device=proxy_tok.device, dtype=proxy_tok.dtype)
        if ref_tok.shape != proxy_tok.shape:
            raise ValueError(
                f"cached reference losses {tuple(ref_tok.shape)} do not match batch {tuple(proxy_tok.shape)}"
            )
        mask = (batch["labels"][:, 1:] != IGNORE_INDEX).to(proxy_tok.dtype)
        return self.dro.step(proxy_tok, ref_tok, mask, row_domain), out.logits

    @property
    def alpha(self) -> np.ndarray:
        return self.dro.alpha

    @property
    def trajectory(self) -> list[list[float]]:
        return self.dro.trajectory

    @property
    def average_weights(self) -> np.ndarray:
        return self.dro.average

    def state_dict(self) -> dict[str, Any]:
        return self.dro.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dro.load_state_dict(state)


def load_doremi_weights(path: str | os.PathLike[str], domain_names: Sequence[str] | None = None) -> dict[str, float]:
    """Read exported weights; with ``domain_names`` check they cover exactly those domains."""
    data = read_json(path)
    weights = dict(zip(data["domain_names"], data["weights"]))
    if domain_names is not None and sorted(weights) != sorted(domain_names):
        raise ValueError(f"{path} has weights for {sorted(weights)}, this run has domains {sorted(domain_names)}")
    return weights


STAGE_HINT = "give this stage another work_dir"
REFERENCE_LOSSES = "reference_losses.npy"  # stage 2's cache, in the reference's folder


def _stage_settings(
    stage: str,
    model: torch.nn.Module,
    train_ds: Any,
    domain_ids: np.ndarray,
    domain_names: Sequence[str],
    loop_kwargs: dict[str, Any],
    **extra: Any,
) -> dict[str, Any]:
    """What a stage's output depends on, recorded in its folder (:func:`dataflex.run_folder.claim_run_folder`): a
    reused work_dir with another model, data, mixture, loop setting or DRO setting would otherwise hand back the
    other settings' reference or weights without a word (a Hydra sweep over ``eta`` reported one set of weights
    for every value)."""
    config = getattr(model, "config", None)
    loop = {
        k: (getattr(v, "__qualname__", None) or type(v).__qualname__) if callable(v) else v
        for k, v in loop_kwargs.items()
        if k not in ("accelerator", "progress", "stop_after", "desc")  # how it runs (its numerics: below)
    }
    return {
        "stage": stage,
        "data": {
            "labels": DatasetFingerprint.from_labels(domain_ids, list(domain_names)).labels_sha256[:16],
            "tokens": token_digest(train_ds),  # the labels say which domains; the text can change under them
        },
        "model": {
            "class": type(model).__qualname__,
            "config": {k: v for k, v in config.to_dict().items() if k not in ("transformers_version", "_name_or_path")}
            if hasattr(config, "to_dict")
            else None,  # (the library's version and a load path do not change the model)
            "parameters": sum(p.numel() for p in model.parameters()),
            "initial_weights": weights_summary(model),
        },
        "loop": {**loop, **changed_numerics(loop_kwargs.get("accelerator"))},  # bf16 or compiled: other numbers
        **extra,
    }


def train_reference(
    make_model: Callable[[], torch.nn.Module],
    train_ds: Any,
    domain_ids: np.ndarray,
    domain_names: Sequence[str],
    out_dir: str | os.PathLike[str],
    *,
    mixture: Literal["uniform", "natural"] = "uniform",
    **loop_kwargs: Any,
) -> torch.nn.Module:
    """Stage 1: train (or load) the reference model on a fixed mixture."""
    out = Path(out_dir)
    model = make_model()
    settings = _stage_settings("reference", model, train_ds, domain_ids, domain_names, loop_kwargs, mixture=mixture)
    claim_run_folder(out, settings, hint=STAGE_HINT)
    if (out / "model.pt").is_file():
        model.load_state_dict(torch.load(open_checked(out / "model.pt"), map_location="cpu"))
        return model
    if mixture not in ("uniform", "natural"):
        raise ValueError(f"mixture={mixture!r}; valid values are 'uniform', 'natural'")
    policy = Uniform() if mixture == "uniform" else Natural()
    result = train_mixture(
        model, train_ds, domain_ids, domain_names, policy, ckpt_dir=out / "ckpt", desc="reference", **loop_kwargs
    )
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "meta.json", {"train_seconds": result.seconds, "mixture": mixture}, digest=True)
    write_checked(out / "model.pt", lambda f: torch.save(model.state_dict(), f))
    return model


def train_proxy(
    make_model: Callable[[], torch.nn.Module],
    train_ds: Any,
    domain_ids: np.ndarray,
    domain_names: Sequence[str],
    ref_losses: np.ndarray,
    out_dir: str | os.PathLike[str],
    *,
    mixture: Literal["uniform", "natural"] = "uniform",
    eta: float = 1.0,
    smoothing: float = 1e-3,
    **loop_kwargs: Any,
) -> dict[str, Any]:
    """Stage 3: Group-DRO proxy training; writes and returns the exported weights."""
    out = Path(out_dir)
    model = make_model()
    reference = np.ascontiguousarray(ref_losses, dtype=np.float64).tobytes()
    settings = _stage_settings(
        "proxy",
        model,
        train_ds,
        domain_ids,
        domain_names,
        loop_kwargs,
        mixture=mixture,
        eta=float(eta),
        smoothing=float(smoothing),
        reference_losses=hashlib.sha1(reference).hexdigest()[:16],
    )
    claim_run_folder(out, settings, hint=STAGE_HINT)
    if (out / WEIGHTS_FILE).is_file():
        return read_json(out / WEIGHTS_FILE)
    objective = GroupDROObjective(ref_losses, len(domain_names), eta=eta, smoothing=smoothing)
    policy = Uniform() if mixture == "uniform" else Natural()
    result: LoopResult = train_mixture(
        model,
        train_ds,
        domain_ids,
        domain_names,
        policy,
        objective=objective,
        ckpt_dir=out / "ckpt",
        desc="proxy",
        **loop_kwargs,
    )
    if loop_kwargs.get("stop_after") is not None and result.steps < loop_kwargs.get("steps", 0):
        return {}  # pre-empted: the checkpoint holds the progress, nothing to export yet
    export = {
        "domain_names": list(domain_names),
        "weights": objective.average_weights.tolist(),
        "final_weights": objective.alpha.tolist(),
        "trajectory": objective.trajectory[:: max(1, len(objective.trajectory) // 200)],
        "eta": eta,
        "smoothing": smoothing,
        "proxy_seconds": result.seconds,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / WEIGHTS_FILE, export, digest=True)
    return export


def run_doremi_offline(
    make_model: Callable[[], torch.nn.Module],
    train_ds: Any,
    domain_ids: np.ndarray,
    domain_names: Sequence[str],
    work_dir: str | os.PathLike[str],
    *,
    reference_mixture: Literal["uniform", "natural"] = "uniform",
    eta: float = 1.0,
    smoothing: float = 1e-3,
    **loop_kwargs: Any,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Stages 1-3 in one call; returns the reference model and the exported weights."""
    work = Path(work_dir)
    reference = train_reference(
        make_model, train_ds, domain_ids, domain_names, work / "reference", mixture=reference_mixture, **loop_kwargs
    )
    cache = work / "reference" / REFERENCE_LOSSES
    if cache.is_file():
        ref_losses = np.load(open_checked(cache))
    else:
        ref_losses = reference_token_losses(reference, train_ds, loop_kwargs["collate"])
        write_checked(cache, lambda f: np.save(f, ref_losses))
    export = train_proxy(
        make_model,
        train_ds,
        domain_ids,
        domain_names,
        ref_losses,
        work / "proxy",
        mixture=reference_mixture,
        eta=eta,
        smoothing=smoothing,
        **loop_kwargs,
    )
    return reference, export


def _checked_mixture(reference_mixture: Any) -> str:
    if reference_mixture not in ("uniform", "natural"):
        raise ValueError(f"reference_mixture={reference_mixture!r}; valid values are 'uniform', 'natural'")
    return reference_mixture


def _optional_steps(name: str, steps: Any) -> int | None:
    if steps is not None and (whole_number(name, steps) < 1):
        raise ValueError(f"{name} must be a positive integer or null (the main run's steps); got {steps}")
    return None if steps is None else int(steps)


class DoReMiOffline(BoundPolicy):
    """Main-run policy with the weights of offline DoReMi (static once computed).

    ``prepare`` (called by ``recipes/mixture.py`` before training) runs or reuses the three stages in
    ``work_dir``; alternatively pass ``weights_path`` to a ``doremi_weights.json`` exported earlier.
    ``proxy_steps`` overrides the number of reference/proxy steps (default: the main run's).
    """

    def __init__(
        self,
        reference_mixture: Literal["uniform", "natural"] = "uniform",
        eta: float = 1.0,
        smoothing: float = 1e-3,
        proxy_steps: int | None = None,
        weights_path: str | None = None,
    ) -> None:
        # Checked here, not after the reference and proxy runs have been trained.
        self.reference_mixture = _checked_mixture(reference_mixture)
        self.eta, self.smoothing = checked_dro_settings(eta, smoothing)
        self.proxy_steps, self.weights_path = _optional_steps("proxy_steps", proxy_steps), weights_path
        self.weights: dict[str, float] | None = None
        self.export: dict[str, Any] = {}

    def prepare(self, make_model, train_ds, domain_ids, domain_names, work_dir, loop_kwargs) -> None:
        if self.weights_path is not None:
            self.weights = load_doremi_weights(self.weights_path, domain_names)
            return
        kwargs = {**loop_kwargs, **({"steps": self.proxy_steps} if self.proxy_steps else {})}
        _, self.export = run_doremi_offline(
            make_model,
            train_ds,
            domain_ids,
            domain_names,
            work_dir,
            reference_mixture=self.reference_mixture,
            eta=self.eta,
            smoothing=self.smoothing,
            **kwargs,
        )
        self.weights = dict(zip(self.export["domain_names"], self.export["weights"]))

    def initial_weights(self) -> np.ndarray:
        self._require_bound()
        if self.weights is None:
            if self.weights_path is None:
                raise RuntimeError("DoReMiOffline has no weights: call prepare() or pass weights_path")
            self.weights = load_doremi_weights(self.weights_path, self.domain_names)
        return validate_weights(self.weights, self.domain_names, what="DoReMi weights")


@torch.no_grad()
def _token_losses(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask, labels) -> torch.Tensor:
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return token_cross_entropy(logits, labels)


class DoReMiOnline(BoundPolicy):
    """Online DoReMi: a small proxy and a frozen reference learn beside the main model.

    Every training micro-batch the main run sees is also fed to :meth:`observe`: the reference gives
    per-token losses, the proxy takes one Group-DRO step, and alpha moves by :func:`doremi_update`.
    Per-domain excess sums and the proxy's gradients are summed across ranks, so every rank keeps an
    identical proxy and identical weights. ``update`` hands the live alpha (or its running average
    with ``use_average=True``) to the sampler. ``proxy_seconds`` accumulates the proxy's cost.

    Args:
        proxy: a causal LM, trained here (usually smaller than or equal to the main model).
        reference: a causal LM trained beforehand on a fixed mixture; kept frozen.
        eta, smoothing: the DoReMi step size and smoothing (paper defaults 1 and 1e-3).
        lr: proxy learning rate (AdamW).
        use_average: hand the sampler the running average of alpha (DoReMi's own output, stable) rather
            than the last alpha, which with small batches swings to nearly one-hot within a few steps
            (the collapse reported in the DoReMi repository's issue #5).
        floor: minimum sampling weight per domain for the main model.
    """

    def __init__(
        self,
        proxy: torch.nn.Module | None,
        reference: torch.nn.Module | None,
        *,
        eta: float = 1.0,
        smoothing: float = 1e-3,
        lr: float = 1e-3,
        use_average: bool = True,
        floor: float = 0.01,
    ) -> None:
        self.eta, self.smoothing = checked_dro_settings(eta, smoothing)
        self.lr, self.use_average = real_number("lr", lr), flag("use_average", use_average)
        self.floor = real_number("floor", floor)
        if not (np.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0 (the proxy's learning rate); got {lr}")
        if not 0 <= self.floor < 1:
            raise ValueError(f"floor must be in [0, 1) (the main model's minimum weight per domain); got {floor}")
        self.proxy: torch.nn.Module | None = None
        self.reference: torch.nn.Module | None = None
        if proxy is not None and reference is not None:
            self.set_models(proxy, reference)
        self.dro: GroupDROWeights | None = None
        self.proxy_seconds = 0.0

    def set_models(self, proxy: torch.nn.Module, reference: torch.nn.Module) -> None:
        """Attach the proxy (trained here) and the reference (frozen)."""
        self.proxy = proxy
        self.reference = reference.eval().requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.proxy.parameters(), lr=self.lr)

    def bind(self, domain_names: Sequence[str], domain_sizes: np.ndarray) -> None:
        super().bind(domain_names, domain_sizes)
        if self.proxy is None or self.reference is None:
            raise RuntimeError("DoReMiOnline needs a proxy and a reference model: pass them or call set_models()")
        self.dro = GroupDROWeights(self.num_domains, self.eta, self.smoothing)

    def initial_weights(self) -> np.ndarray:
        self._require_bound()
        return np.full(self.num_domains, 1.0 / self.num_domains)

    @property
    def alpha(self) -> np.ndarray:
        """The live weights (after the latest proxy step)."""
        assert self.dro is not None, "bind() first"
        return self.dro.alpha

    @property
    def steps(self) -> int:
        return self.dro.steps if self.dro is not None else 0

    @property
    def average_weights(self) -> np.ndarray:
        assert self.dro is not None, "bind() first"
        return self.dro.average

    def observe(self, inputs: dict[str, torch.Tensor], row_domain: torch.Tensor) -> None:
        """One proxy step on a micro-batch (``input_ids``, ``attention_mask``, ``labels``)."""
        self._require_bound()
        start = time.perf_counter()
        device = next(self.proxy.parameters()).device
        ids = inputs["input_ids"].to(device)
        att = inputs.get("attention_mask")
        att = att.to(device) if att is not None else None
        labels = inputs["labels"].to(device)
        row_domain = row_domain.to(device)
        mask = (labels[:, 1:] != IGNORE_INDEX).float()
        ref_tok = _token_losses(self.reference, ids, att, labels).to(device)
        self.proxy.train()
        proxy_tok = token_cross_entropy(self.proxy(input_ids=ids, attention_mask=att).logits, labels)
        loss = self.dro.step(proxy_tok, ref_tok, mask, row_domain)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if dist.is_distributed():
            for p in self.proxy.parameters():
                if p.grad is not None:
                    p.grad.copy_(dist.all_reduce_sum(p.grad))
        self.optimizer.step()
        self.proxy_seconds += time.perf_counter() - start

    def update(self, stats: DomainStats, current: np.ndarray) -> np.ndarray:
        self._require_bound()
        weights = self.average_weights if self.use_average else self.alpha.copy()
        return apply_floor(weights, self.floor)

    def state_dict(self) -> dict[str, Any]:
        # The proxy's parameters and optimizer are tensors: see tensor_state_dict (TensorStateful),
        # which every checkpoint writer saves beside this JSON-safe part.
        return {"dro": self.dro.state_dict(), "proxy_seconds": self.proxy_seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dro.load_state_dict(state["dro"])
        self.proxy_seconds = float(state["proxy_seconds"])

    def tensor_state_dict(self) -> dict[str, Any]:
        """Proxy weights and optimizer (:class:`~dataflex.state.TensorStateful`)."""
        return {"proxy": self.proxy.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_tensor_state_dict(self, state: dict[str, Any]) -> None:
        self.proxy.load_state_dict(state["proxy"])
        self.optimizer.load_state_dict(state["optimizer"])


class PreparedDoReMiOnline(DoReMiOnline):
    """:class:`DoReMiOnline` whose reference is trained (or reused) by ``prepare`` and whose proxy is a
    fresh model of the same architecture, so a config needs no model objects."""

    def __init__(
        self,
        reference_mixture: Literal["uniform", "natural"] = "uniform",
        reference_steps: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(None, None, **kwargs)
        self.reference_mixture = _checked_mixture(reference_mixture)
        self.reference_steps = _optional_steps("reference_steps", reference_steps)

    def prepare(self, make_model, train_ds, domain_ids, domain_names, work_dir, loop_kwargs) -> None:
        kwargs = {**loop_kwargs, **({"steps": self.reference_steps} if self.reference_steps else {})}
        reference = train_reference(
            make_model,
            train_ds,
            domain_ids,
            domain_names,
            Path(work_dir) / "reference",
            mixture=self.reference_mixture,
            **kwargs,
        )
        self.set_models(make_model(), reference)
