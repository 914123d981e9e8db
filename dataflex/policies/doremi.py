"""DoReMi: domain weights from a Group-DRO proxy model (Xie et al., arXiv 2305.10429).

A *reference* model is trained on a fixed mixture. A *proxy* model of the same size is then trained
with Group DRO: at every step, for each domain ``i``,

    excess_i = sum over domain-i tokens of max(loss_proxy - loss_ref, 0) / number of domain-i tokens
    alpha    = softmax(log(alpha) + eta * excess)            (exponentiated-gradient ascent)
    alpha    = (1 - c) * alpha + c / K                        (smoothing towards uniform)

and the proxy minimises the alpha-weighted per-domain loss. The weights used for the main run are the
average of alpha over proxy training. Defaults follow the paper's code: eta = 1, c = 1e-3.

This module has the pure update rule: :func:`doremi_update`, the Group-DRO step on a micro-batch and
the running weights. Proxy training — the offline three stages and the *online* variant, whose proxy
and frozen reference step on the main run's own batches — lives in ``dataflex.proxies.doremi``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dataflex import dist
from dataflex.checks import real_number
from dataflex.state import saved_count, saved_vector
from dataflex.weights import SUM_TOLERANCE

__all__ = ["GroupDROWeights", "checked_dro_settings", "domain_excess", "doremi_update", "group_dro_step"]


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


def checked_dro_settings(eta: Any, smoothing: Any) -> tuple[float, float]:
    """``eta`` (> 0: a negative step would move weight toward the domains the proxy already learns best) and
    ``smoothing`` (in [0, 1): the share of uniform mixed into every alpha), or ``ValueError`` naming them."""
    eta, smoothing = real_number("eta", eta), real_number("smoothing", smoothing)
    if not (np.isfinite(eta) and eta > 0):
        raise ValueError(f"eta must be a finite number > 0 (DoReMi's step size; the paper uses 1); got {eta}")
    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing must be in [0, 1) (the uniform share mixed into the weights); got {smoothing}")
    return eta, smoothing


class GroupDROWeights:
    """DoReMi's domain weights during proxy training: alpha, their running sum and the step count.

    Shared by the offline proxy objective and the online policy; ``trajectory`` optionally keeps
    every alpha for export and plots.
    """

    def __init__(self, num_domains: int, eta: float, smoothing: float, keep_trajectory: bool = False) -> None:
        self.eta, self.smoothing = checked_dro_settings(eta, smoothing)
        self.keep_trajectory = keep_trajectory
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
        return {
            "alpha": self.alpha.tolist(),
            "alpha_sum": self.alpha_sum.tolist(),
            "steps": self.steps,
            "trajectory": self.trajectory,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        alpha = saved_vector(state, "alpha", "DoReMi", nonnegative=True)
        if abs(alpha.sum() - 1.0) > SUM_TOLERANCE:
            raise ValueError(f"DoReMi state 'alpha' must sum to 1; got {alpha.sum():.8g}")
        self.alpha_sum = saved_vector(state, "alpha_sum", "DoReMi", alpha.shape[0], nonnegative=True)
        self.alpha, self.steps = alpha, saved_count(state, "steps", "DoReMi")
        self.trajectory = [list(r) for r in state.get("trajectory", [])]
