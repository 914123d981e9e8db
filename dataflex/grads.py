"""Per-example gradients of linear layers from one batched backward, and their random projection.

For a linear layer ``y = x W^T`` applied to every token, the gradient of example ``b``'s loss with
respect to ``W`` is ``sum_t g[b, t]^T x[b, t]`` where ``g = dL/dy``. Backpropagating the *sum* of the
per-example losses gives every row its own ``g`` (examples do not interact in a causal LM forward), so
one backward plus one ``einsum`` per layer yields all per-example gradients. Measured here on a tiny
GPT-2 with LoRA this is several times faster than a per-example loop and matches it exactly, whereas
``torch.func.vmap(grad(...))`` was slower than the loop on CPU (SDPA has no batching rule there).

LoRA adapters are pairs of bias-free ``nn.Linear`` layers (``lora_A``, ``lora_B``), so capturing them is
the same as capturing any linear layer; :func:`lora_linears` finds them in a peft model.

The projection (:class:`RademacherProjector`) maps each layer's flattened per-example gradient to
``k`` dimensions with a seeded ±1/sqrt(k) matrix, layer by layer and chunk by chunk, so neither the
full gradient vector nor the full projection matrix ever has to be in memory at once
(Johnson–Lindenstrauss: inner products are preserved up to a small relative error).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

__all__ = ["PerExampleGradients", "RademacherProjector", "lora_linears"]


def lora_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The trainable LoRA ``lora_A`` / ``lora_B`` linear layers of a peft model, by module name."""
    found = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and (".lora_A." in name + "." or ".lora_B." in name + ".")
        and module.weight.requires_grad
    }
    if not found:
        raise ValueError("no trainable lora_A/lora_B linear layers found; is this a peft LoRA model?")
    return found


class PerExampleGradients:
    """Capture inputs and output-gradients of some linear layers during one forward/backward.

    Usage::

        capture = PerExampleGradients(lora_linears(model))
        with capture.recording():
            loss_per_example = ...           # (batch,) from one forward
        capture.backward(loss_per_example.sum())
        grads = capture.per_example()        # {name: (batch, out, in)}

    :meth:`backward` asks autograd only for the gradients of the captured layers' *outputs*, so the
    weight-gradient GEMMs of the whole network are skipped (they are rebuilt per example by ``einsum``).
    A plain ``loss.backward()`` inside ``recording()`` works too (tensor hooks catch the same gradients).
    """

    def __init__(self, layers: Mapping[str, nn.Linear]) -> None:
        for name, layer in layers.items():
            if not isinstance(layer, nn.Linear):
                raise TypeError(f"{name} is a {type(layer).__name__}; only nn.Linear layers are supported")
            if layer.bias is not None and layer.bias.requires_grad:
                raise ValueError(f"{name} has a trainable bias; per-example bias gradients are not captured")
        self.layers = dict(layers)
        self._inputs: dict[str, torch.Tensor] = {}
        self._outputs: dict[str, torch.Tensor] = {}
        self._grads: dict[str, torch.Tensor] = {}

    @contextmanager
    def recording(self) -> Iterator[PerExampleGradients]:
        handles = []
        self._inputs.clear()
        self._outputs.clear()
        self._grads.clear()

        def make_hook(name: str):
            def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
                self._inputs[name] = args[0].detach()
                if output.requires_grad:
                    self._outputs[name] = output
                    output.register_hook(lambda g: self._grads.__setitem__(name, g.detach()))

            return hook

        for name, layer in self.layers.items():
            handles.append(layer.register_forward_hook(make_hook(name)))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def backward(self, loss: torch.Tensor) -> None:
        """Gradients of ``loss`` w.r.t. the captured outputs only (no parameter ``.grad`` is touched)."""
        if not self._outputs:
            raise RuntimeError("nothing was recorded: run the forward inside recording()")
        names = list(self._outputs)
        grads = torch.autograd.grad(loss, [self._outputs[n] for n in names], allow_unused=True)
        self._outputs.clear()  # drop the graph references
        for name, g in zip(names, grads):
            if g is not None:
                self._grads[name] = g.detach()

    def per_example(self) -> dict[str, torch.Tensor]:
        """``{name: (batch, out_features, in_features)}`` per-example weight gradients."""
        missing = [n for n in self.layers if n not in self._grads]
        if missing:
            raise RuntimeError(f"no gradient was captured for {missing[:3]}...: run backward after recording()")
        out = {}
        for name in self.layers:
            x, g = self._inputs[name], self._grads[name]
            if x.dim() == 2:  # (batch, features): no token axis
                x, g = x.unsqueeze(1), g.unsqueeze(1)
            out[name] = torch.einsum("bto,bti->boi", g, x)
        self._inputs.clear()
        self._grads.clear()
        return out


class RademacherProjector:
    """Seeded random projection of per-layer gradients to ``dim`` dimensions.

    Entry ``(i, j)`` of layer ``l``'s matrix is ±1/sqrt(dim), drawn from
    ``SeedSequence([seed, l, chunk])`` for row chunk ``chunk`` of ``chunk_rows`` rows, so the
    projection is the same on every device and every run. Matrices are cached up to
    ``cache_bytes``; beyond that they are regenerated chunk by chunk when used.
    """

    def __init__(self, dim: int, seed: int = 0, chunk_rows: int = 4096, cache_bytes: int = 256 << 20) -> None:
        if dim <= 0:
            raise ValueError(f"projection dim must be positive; got {dim}")
        self.dim, self.seed, self.chunk_rows, self.cache_bytes = int(dim), int(seed), int(chunk_rows), cache_bytes
        self._cache: dict[tuple[int, int, int], torch.Tensor] = {}
        self._cached = 0

    def _chunk(self, layer: int, chunk: int, rows: int, device: torch.device) -> torch.Tensor:
        key = (layer, chunk, rows)
        mat = self._cache.get(key)
        if mat is None:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, layer, chunk]))
            signs = rng.integers(0, 2, size=(rows, self.dim), dtype=np.int8) * 2 - 1
            mat = torch.from_numpy((signs / np.sqrt(self.dim)).astype(np.float32))
            if self._cached + mat.numel() * 4 <= self.cache_bytes:
                self._cache[key] = mat
                self._cached += mat.numel() * 4
        return mat.to(device)

    def project(self, grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Sum over layers of ``flatten(grad_l) @ R_l``: ``(batch, dim)`` in float32."""
        out: torch.Tensor | None = None
        for layer, name in enumerate(grads):
            flat = grads[name].reshape(grads[name].shape[0], -1).float()
            for chunk, start in enumerate(range(0, flat.shape[1], self.chunk_rows)):
                part = flat[:, start : start + self.chunk_rows]
                contrib = part @ self._chunk(layer, chunk, part.shape[1], part.device)
                out = contrib if out is None else out + contrib
        if out is None:
            raise ValueError("no gradients to project")
        return out
