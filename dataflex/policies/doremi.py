"""DoReMi: domain weights from a Group-DRO proxy model (Xie et al., arXiv 2305.10429).

A *reference* model is trained on a fixed mixture. A *proxy* model of the same size is then trained
with Group DRO: at every step, for each domain ``i``,

    excess_i = sum over domain-i tokens of max(loss_proxy - loss_ref, 0) / number of domain-i tokens
    alpha    = softmax(log(alpha) + eta * excess)            (exponentiated-gradient ascent)
    alpha    = (1 - c) * alpha + c / K                        (smoothing towards uniform)

and the proxy minimises the alpha-weighted per-domain loss. The weights used for the main run are the
average of alpha over proxy training. Defaults follow the paper's code: eta = 1, c = 1e-3.

This module has the pure update and the *online* variant (not in the paper's code): the proxy and the
frozen reference step on the main run's own batches, and their live alpha drives the main sampler.
The offline three-stage pipeline lives in ``dataflex.proxies.doremi``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from dataflex import dist
from dataflex.losses import IGNORE_INDEX, token_cross_entropy
from dataflex.policies.base import BoundPolicy
from dataflex.store import DomainStats
from dataflex.weights import apply_floor


def doremi_update(weights: np.ndarray, excess: np.ndarray, eta: float = 1.0, smoothing: float = 1e-3) -> np.ndarray:
    """One exponentiated-gradient step on the domain weights, then smoothing towards uniform.

    ``weights`` must be positive and sum to 1; ``excess`` is the per-domain clipped excess loss
    (non-finite entries count as 0). The result is finite, sums to 1 and is at least ``smoothing / K``.
    """
    w = np.asarray(weights, dtype=np.float64)
    x = np.asarray(excess, dtype=np.float64)
    if w.shape != x.shape or w.ndim != 1:
        raise ValueError(f"weights {w.shape} and excess {x.shape} must be 1-D of the same length")
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"smoothing must lie in [0, 1]; got {smoothing}")
    if not (np.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta must be a finite number >= 0; got {eta}")
    x = np.where(np.isfinite(x), x, 0.0)
    logits = np.log(np.maximum(w, 1e-300)) + eta * x
    logits -= logits.max()
    new = np.exp(logits)
    new /= new.sum()
    k = w.shape[0]
    return (1.0 - smoothing) * new + smoothing / k


@torch.no_grad()
def _token_losses(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask, labels) -> torch.Tensor:
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return token_cross_entropy(logits, labels)


def domain_excess(
    proxy_tok: torch.Tensor, ref_tok: torch.Tensor, mask: torch.Tensor, row_domain: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-domain sums of clipped excess loss and token counts (not yet divided), shape ``(k,)`` each."""
    excess_tok = torch.clamp(proxy_tok.detach() - ref_tok, min=0) * mask
    per_row = excess_tok.sum(1)
    tokens = mask.sum(1)
    sums = torch.zeros(k, dtype=torch.float64, device=per_row.device).index_add_(0, row_domain, per_row.double())
    counts = torch.zeros(k, dtype=torch.float64, device=per_row.device).index_add_(0, row_domain, tokens.double())
    return sums, counts


def group_dro_step(
    proxy_tok: torch.Tensor,
    ref_tok: torch.Tensor,
    mask: torch.Tensor,
    row_domain: torch.Tensor,
    alpha: np.ndarray,
    eta: float,
    smoothing: float,
) -> tuple[np.ndarray, torch.Tensor]:
    """One DoReMi step on a micro-batch: new domain weights and the proxy's Group-DRO loss.

    Per-domain excess sums and token counts are summed over ranks first, so every rank gets the same
    weights; the loss divides each domain's local token-loss sum by the *all-rank* token count, so
    summing the ranks' gradients gives exactly the gradient of the global objective.
    """
    k = alpha.shape[0]
    sums, counts = domain_excess(proxy_tok, ref_tok, mask, row_domain, k)
    reduced = dist.all_reduce_sum(torch.cat([sums, counts]))
    sums, counts = reduced[:k], reduced[k:]
    excess = torch.where(counts > 0, sums / counts.clamp(min=1), torch.zeros_like(sums))
    new_alpha = doremi_update(alpha, excess.cpu().numpy(), eta, smoothing)
    row_loss = (proxy_tok * mask).sum(1)
    dom_loss = torch.zeros(k, device=proxy_tok.device, dtype=row_loss.dtype).index_add_(0, row_domain, row_loss)
    weights = torch.as_tensor(new_alpha, dtype=row_loss.dtype, device=proxy_tok.device)
    loss = (weights * dom_loss / counts.to(row_loss.dtype).to(proxy_tok.device).clamp(min=1)).sum()
    return new_alpha, loss


class GroupDROWeights:
    """DoReMi's domain weights during proxy training: alpha, their running sum and the step count.

    Shared by the offline proxy objective and the online policy; ``trajectory`` optionally keeps
    every alpha for export and plots.
    """

    def __init__(self, num_domains: int, eta: float, smoothing: float, keep_trajectory: bool = False) -> None:
        self.eta, self.smoothing, self.keep_trajectory = float(eta), float(smoothing), keep_trajectory
        self.alpha = np.full(num_domains, 1.0 / num_domains)
        self.alpha_sum = np.zeros(num_domains)
        self.steps = 0
        self.trajectory: list[list[float]] = []

    def step(self, proxy_tok, ref_tok, mask, row_domain) -> torch.Tensor:
        """Move alpha by one Group-DRO step and return the proxy's loss for this micro-batch."""
        self.alpha, loss = group_dro_step(proxy_tok, ref_tok, mask, row_domain, self.alpha, self.eta, self.smoothing)
        self.alpha_sum += self.alpha
        self.steps += 1
        if self.keep_trajectory:
            self.trajectory.append(self.alpha.tolist())
        return loss

    @property
    def average(self) -> np.ndarray:
        """DoReMi's output: alpha averaged over the steps so far (alpha itself before the first step)."""
        return self.alpha_sum / self.steps if self.steps else self.alpha.copy()

    def state_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha.tolist(), "alpha_sum": self.alpha_sum.tolist(), "steps": self.steps,
                "trajectory": self.trajectory}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.alpha = np.asarray(state["alpha"], dtype=np.float64)
        self.alpha_sum = np.asarray(state["alpha_sum"], dtype=np.float64)
        self.steps = int(state["steps"])
        self.trajectory = [list(r) for r in state.get("trajectory", [])]


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
        self.eta, self.smoothing, self.lr, self.use_average = float(eta), float(smoothing), float(lr), use_average
        self.floor = float(floor)
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
