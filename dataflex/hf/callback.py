"""``DataFlexCallback``: online domain mixing on an unmodified ``transformers.Trainer``.

What happens, in Trainer events::

    on_train_begin   build the DomainMixtureSampler, put it inside the prepared DataLoader's
                     BatchSampler, hook the model's forward, restore state from the checkpoint
    forward (hook)   per-example token-mean CE from the step's own logits and labels -> ScoreStore
    on_step_end      every `update_every` steps after `warmup_steps`: gather all ranks' records,
                     per-domain stats -> policy -> weights scheduled `lookahead` samples ahead;
                     weights, entropy and non-finite counts go through Trainer.log
    on_save          dataflex_state.json into the checkpoint folder

Ownership of the position on resume: the Trainer fast-forwards the DataLoader past consumed batches
(``skip_first_batches``), so the sampler restores its schedule and epoch but *not* its position;
it regenerates the epoch from position 0 and the Trainer discards what was already trained on.
"""

from __future__ import annotations

import inspect
import logging
import os
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from transformers import Trainer, TrainerCallback

from dataflex import dist
from dataflex.batching import inspect_loader, rank_position_batches
from dataflex.domains import encode_domains
from dataflex.embeddings import mean_pool, output_layer
from dataflex.hf.checkpoint_weights import repair_resumed_weights
from dataflex.losses import IGNORE_INDEX, per_example_token_loss
from dataflex.policies.base import MixingPolicy
from dataflex.samplers.mixture import DomainMixtureSampler, ExhaustionMode
from dataflex.schedule import WeightSchedule
from dataflex.state import read_json, unwrap_state, wrap_state, write_json_atomic
from dataflex.store import DomainStats, ScoreStore
from dataflex.vlm import check_image_batch, image_token_id, projector
from dataflex.weights import entropy

logger = logging.getLogger(__name__)

STATE_FILENAME = "dataflex_state.json"
EMBEDDINGS_FILENAME = "dataflex_embeddings.npz"
CHECKS_AFTER_START = 4  # micro-batches whose input_ids are compared with the dataset after (re)start


def _find_trainer() -> tuple[Trainer | None, str | None]:
    """The Trainer running this event and the checkpoint it resumes from, read off the call stack.

    Callbacks are not handed the Trainer; walking up to the frame of ``Trainer._inner_training_loop``
    lets us log through ``Trainer.log`` (so TensorBoard/wandb see our metrics) and find the checkpoint
    folder even when it is not under ``output_dir``.
    """
    frame = inspect.currentframe()
    try:
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, Trainer):
                resume = frame.f_locals.get("resume_from_checkpoint")
                return owner, resume if isinstance(resume, str) else None
            frame = frame.f_back
        return None, None
    finally:
        del frame


class DataFlexCallback(TrainerCallback):
    """Mix domains online while a stock ``transformers.Trainer`` trains.

    Args:
        policy: a mixing policy (``Uniform()``, ``Natural()``, ``Temperature(tau)``, ``Static(w)``, ``ODM()``).
        domains: the domain label of every training example, in dataset order. Needed because the
            Trainer removes columns the model does not accept; pass ``train_ds["domain"]``. If omitted,
            the column ``domain_column`` is read from the DataLoader's dataset (kept only when
            ``remove_unused_columns=False``).
        domain_column: column name used when ``domains`` is omitted.
        update_every: optimizer steps between policy updates.
        warmup_steps: no update before this many steps (losses are still recorded).
        seed: sampler seed; defaults to ``TrainingArguments.seed``.
        replacement / when_exhausted: passed to :class:`DomainMixtureSampler`.
        lookahead_batches: per-rank batches between the step a decision is made and the sample it
            takes effect at. Default: gradient accumulation + workers × prefetch factor + 2, which is
            more than the Trainer and the DataLoader can ever have prefetched.
        check_ids: compare a few batches' ``input_ids`` with the dataset after each (re)start and
            raise if dataflex's idea of which examples are in a batch is wrong.
        allow_missing_state: resume even when the checkpoint has no dataflex state (order and weights
            then differ from the uninterrupted run); by default that raises.
        stratified: exact domain quotas (see :class:`DomainMixtureSampler`); with clusters as domains
            and ``Uniform()`` this is cluster-balanced sampling.
        embeddings: an :class:`~dataflex.embeddings.EmbeddingCache` filled during training with each
            example's mean-pooled last hidden state (from the training forward, no extra pass) and the
            step it was taken at; saved in every checkpoint. Each rank fills the examples it trains on.
        embeddings_from: ``"text"`` (mean-pooled last hidden state over the attention mask) or ``"image"``
            (a LLaVA-style model's projected image features, mean over patches; one image per example).
        check_images: on a model with an image token, check every training batch before its forward
            (image tokens without ``pixel_values``, wrong image count/shape, NaN pixels) and raise a
            ``ValueError`` naming the example ids, instead of silently training without the image.
    """

    POLICY_METHODS = ("bind", "initial_weights", "update", "state_dict", "load_state_dict")
    POLICY_KIND = "dataflex.policies"

    def __init__(
        self,
        policy: MixingPolicy,
        domains: Sequence[str] | None = None,
        *,
        domain_column: str = "domain",
        update_every: int = 50,
        warmup_steps: int = 0,
        seed: int | None = None,
        replacement: bool = False,
        when_exhausted: ExhaustionMode = "reshuffle",
        lookahead_batches: int | None = None,
        check_ids: bool = True,
        allow_missing_state: bool = False,
        stratified: bool = False,
        embeddings: Any = None,
        embeddings_from: Literal["text", "image"] = "text",
        check_images: bool = True,
    ) -> None:
        if not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"update_every must be a positive integer; got {update_every!r}")
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0; got {warmup_steps!r}")
        if lookahead_batches is not None and lookahead_batches < 1:
            raise ValueError(f"lookahead_batches must be >= 1; got {lookahead_batches!r}")
        if embeddings_from not in ("text", "image"):
            raise ValueError(f"embeddings_from must be 'text' or 'image'; got {embeddings_from!r}")
        for method in self.POLICY_METHODS:
            if not callable(getattr(policy, method, None)):
                raise TypeError(f"policy {policy!r} has no {method}(); use one of {self.POLICY_KIND}")
        self.policy = policy
        self.domains = None if domains is None else [str(d) for d in domains]
        self.domain_column = domain_column
        self.update_every = update_every
        self.warmup_steps = warmup_steps
        self.seed = seed
        self.replacement = replacement
        self.when_exhausted: ExhaustionMode = when_exhausted
        self.lookahead_batches = lookahead_batches
        self.check_ids = check_ids
        self.allow_missing_state = allow_missing_state
        self.stratified = bool(stratified)
        self.embeddings = embeddings
        self.embeddings_from = embeddings_from
        self.check_images = bool(check_images)
        self._side_hooks: list[torch.utils.hooks.RemovableHandle] = []  # embedding capture, image checks
        self._last_hidden: torch.Tensor | None = None
        self._step_now = 0
        #: Every scheduled mixture: dicts with step, effective_at (global sample index) and weights.
        self.history: list[dict[str, Any]] = []
        self.missing_labels = 0
        self.sampler: DomainMixtureSampler | None = None
        self.store: ScoreStore | None = None
        self.domain_names: list[str] = []
        self._trainer: Trainer | None = None
        self._hook: torch.utils.hooks.RemovableHandle | None = None
        self._step_records: list[tuple[np.ndarray, torch.Tensor, torch.Tensor]] = []
        self._in_step = False
        self._loss_wrapped = False
        self._pending: tuple[torch.nn.Module, dict, Any] | None = None

    # -- public read-outs ----------------------------------------------------------------------------
    @property
    def weights(self) -> dict[str, float]:
        """The most recently scheduled weights by domain name."""
        if self.sampler is None:
            raise RuntimeError("training has not started: weights are set in on_train_begin")
        return dict(zip(self.domain_names, self.sampler.schedule.current.tolist()))

    def last_step_records(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This rank's (example ids, per-example losses, valid mask) of the current/last optimizer step."""
        if not self._step_records:
            return np.zeros(0, np.int64), np.zeros(0), np.zeros(0, bool)
        ids = np.concatenate([r[0] for r in self._step_records])
        loss = torch.cat([r[1].float() for r in self._step_records]).cpu().numpy()
        has = torch.cat([r[2] for r in self._step_records]).cpu().numpy()
        return ids, loss, has & np.isfinite(loss)

    def wrap_loss(self, loss_func: Any) -> Any:
        """A ``compute_loss_func`` that lets dataflex see the labels, then calls ``loss_func``.

        With ``compute_loss_func`` set, the Trainer pops ``labels`` before the forward, so the forward
        hook cannot score the batch. Pass ``Trainer(compute_loss_func=callback.wrap_loss(my_loss))``:
        the hook keeps the step's outputs and this wrapper scores them with the labels it receives.
        """
        self._loss_wrapped = True

        def compute_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
            pending, self._pending = self._pending, None
            if pending is not None:
                module, kwargs, output = pending
                self._on_forward(module, (), {**kwargs, "labels": labels}, output)
            return loss_func(outputs, labels, num_items_in_batch)

        return compute_loss

    # -- setup -----------------------------------------------------------------------------------------
    def _labels(self, dataset: Any) -> list[str]:
        if self.domains is not None:
            labels = self.domains
        else:
            columns = list(getattr(dataset, "column_names", None) or [])
            if self.domain_column not in columns:
                raise ValueError(
                    f"the training dataset has no column {self.domain_column!r} (columns: {columns}). The Trainer "
                    "drops columns the model does not take; pass the labels explicitly: "
                    f"DataFlexCallback(policy, domains=train_dataset[{self.domain_column!r}])"
                )
            labels = [str(x) for x in dataset[self.domain_column]]
        if len(labels) != len(dataset):
            raise ValueError(
                f"got {len(labels)} domain labels for a training set of {len(dataset)} examples; "
                "give one label per example, in dataset order"
            )
        return labels

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):  # noqa: D401
        if train_dataloader is None or model is None:
            raise RuntimeError("DataFlexCallback needs the Trainer's model and train_dataloader in on_train_begin")
        self._trainer, resume_dir = _find_trainer()
        layout = inspect_loader(train_dataloader)
        dataset = train_dataloader.dataset
        domain_ids, self.domain_names = encode_domains(self._labels(dataset))
        self.sampler = self._build_sampler(domain_ids, args.seed if self.seed is None else self.seed, len(dataset))
        layout.batch_sampler.sampler = self.sampler
        self.store = ScoreStore(domain_ids, len(self.domain_names))
        self._layout = layout
        self._dataset = dataset
        self._model = model
        self._optimizer = kwargs.get("optimizer")
        self._collate = train_dataloader.collate_fn
        self._positions = rank_position_batches(self.sampler.num_samples, layout)
        accum = args.gradient_accumulation_steps
        self._accum = accum
        n_batches = len(self._positions)
        self._updates_per_epoch = max(n_batches // accum + int(n_batches % accum > 0), 1)
        lookahead = self.lookahead_batches or accum + layout.num_workers * layout.prefetch_factor + 2
        self._lookahead_samples = lookahead * layout.world_size * layout.batch_size
        self._epoch = 0
        self._checks_left = CHECKS_AFTER_START if self.check_ids else 0
        if self._hook is not None:
            self._hook.remove()
        self._hook = model.register_forward_hook(self._on_forward, with_kwargs=True)
        self._remove_side_hooks()
        if self.embeddings is not None:
            self._side_hooks.append(self._embedding_hook(model))
        if self.check_images and image_token_id(model) is not None:
            self._side_hooks.append(model.register_forward_pre_hook(self._before_forward, with_kwargs=True))
        if state.global_step > 0:
            self._restore(args, state, resume_dir)
        elif not self.history:
            self.history.append(self._history_entry(0, 0))

    def _embedding_hook(self, model: torch.nn.Module) -> torch.utils.hooks.RemovableHandle:
        """Capture what the embedding of each training example is made of during the training forward."""
        if self.embeddings_from == "image":
            # Projected image features, pooled over patches: one row per image (= per example here).
            return projector(model).register_forward_hook(
                lambda m, a, out: setattr(self, "_last_hidden", out.detach().float().mean(dim=1))
            )
        # The LM head's input is the last hidden state; pooled over the attention mask in _on_forward.
        return output_layer(model).register_forward_pre_hook(lambda m, a: setattr(self, "_last_hidden", a[0]))

    def _remove_side_hooks(self) -> None:
        for handle in self._side_hooks:
            handle.remove()
        self._side_hooks = []

    def _build_sampler(self, domain_ids: np.ndarray, seed: int, num_samples: int) -> DomainMixtureSampler:
        """The sampler dataflex installs; subclasses with another kind of decision override this."""
        sizes = np.bincount(domain_ids, minlength=len(self.domain_names))
        self.policy.bind(self.domain_names, sizes)
        schedule = WeightSchedule(self.domain_names, self.policy.initial_weights())
        return DomainMixtureSampler(
            domain_ids,
            schedule,
            seed=seed,
            num_samples=num_samples,
            replacement=self.replacement,
            when_exhausted=self.when_exhausted,
            stratified=self.stratified,
        )

    def _history_entry(self, step: int, effective_at: int) -> dict[str, Any]:
        return {"step": step, "effective_at": effective_at, "weights": self.sampler.schedule.current.tolist()}

    def _restore(self, args, state, resume_dir: str | None) -> None:
        folder = resume_dir or os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            repair_resumed_weights(self._model, folder)
        path = os.path.join(folder, STATE_FILENAME)
        if not os.path.isfile(path):
            message = (
                f"resuming at step {state.global_step} but {path} does not exist: this checkpoint has no dataflex "
                "state, so the example order and domain weights of the interrupted run cannot be reproduced"
            )
            if not self.allow_missing_state:
                raise FileNotFoundError(message + " (pass allow_missing_state=True to start the mixture afresh)")
            warnings.warn(message + "; starting the mixture afresh", stacklevel=2)
            return
        self.load_state_dict(read_json(path), global_step=state.global_step)
        embeddings_path = os.path.join(folder, EMBEDDINGS_FILENAME)
        if self.embeddings is not None and os.path.isfile(embeddings_path):
            self.embeddings.load(embeddings_path)

    # -- per-example loss ----------------------------------------------------------------------------
    def _on_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not (module.training and self._in_step):
            return  # evaluation, generation or a forward outside the training step
        labels = kwargs.get("labels")
        if labels is None and self._loss_wrapped:
            self._pending = (module, kwargs, output)  # the wrapped compute_loss_func brings the labels
            return
        if labels is None:
            self.missing_labels += 1
            if self.missing_labels == 1:
                warnings.warn("a training forward had no `labels`: dataflex cannot score it", stacklevel=2)
            return
        logits = output["logits"] if isinstance(output, dict) or hasattr(output, "keys") else output[1]
        if self._micro >= len(self._positions):
            raise RuntimeError(
                f"dataflex saw micro-batch {self._micro} of epoch {self._epoch} but this rank only has "
                f"{len(self._positions)}; batch bookkeeping is out of sync"
            )
        ids = self.sampler.ids_at(self._epoch, self._positions[self._micro])
        if labels.shape[0] != ids.shape[0]:
            raise RuntimeError(
                f"batch has {labels.shape[0]} examples but dataflex expected {ids.shape[0]} at micro-batch "
                f"{self._micro}; was the DataLoader rebuilt after on_train_begin?"
            )
        if self._checks_left > 0:
            self._check_ids(ids, kwargs)
        loss, _ = per_example_token_loss(logits, labels)
        has_tokens = (labels[:, 1:] != IGNORE_INDEX).any(dim=1)
        self.store.add(ids, loss, has_tokens)
        self._step_records.append((ids, loss, has_tokens))
        if self.embeddings is not None and self._last_hidden is not None:
            if self.embeddings_from == "image":
                pooled = self._last_hidden
                if pooled.shape[0] != ids.shape[0]:
                    raise RuntimeError(
                        f"embeddings_from='image' needs one image per example; this batch has {pooled.shape[0]} "
                        f"images for {ids.shape[0]} examples"
                    )
            else:
                pooled = mean_pool(self._last_hidden.detach().float(), kwargs.get("attention_mask"))
            self.embeddings.update(ids, pooled, step=self._step_now)
            self._last_hidden = None
        observe = getattr(self.policy, "observe", None)
        if observe is not None:  # online DoReMi: the proxy steps on this very micro-batch
            batch = {k: kwargs[k] for k in ("input_ids", "attention_mask", "labels") if kwargs.get(k) is not None}
            observe(batch, torch.as_tensor(self.sampler.domain_ids[ids], device=labels.device))
        self._micro += 1

    def _before_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """VLM batches: refuse a training batch whose images are missing or malformed, naming its examples."""
        if not (module.training and self._in_step):
            return
        ids = None
        if self._micro < len(self._positions):
            ids = self.sampler.ids_at(self._epoch, self._positions[self._micro]).tolist()
        check_image_batch(module, kwargs, ids)

    def _check_ids(self, ids: np.ndarray, kwargs: dict) -> None:
        self._checks_left -= 1
        batch_ids = kwargs.get("input_ids")
        try:
            expected = self._dataset[int(ids[0])].get("input_ids")
        except Exception:  # a dataset without input_ids (or a custom one): nothing to check against
            return
        if batch_ids is None or expected is None:
            return
        row = batch_ids[0]
        mask = kwargs.get("attention_mask")
        if mask is not None:
            row = row[mask[0].bool()]
        expected_t = torch.as_tensor(expected, device=row.device)
        if row.shape != expected_t.shape or not torch.equal(row, expected_t):
            raise RuntimeError(
                f"dataflex believes the first example of this batch is id {int(ids[0])}, but the batch's input_ids "
                "differ from that example's. The DataLoader's sampler was changed after dataflex installed its "
                "own, or the collator rewrites tokens (pass check_ids=False if it does so on purpose)"
            )

    # -- the control loop ------------------------------------------------------------------------------
    def on_epoch_begin(self, args, state, control, **kwargs):
        self._epoch = state.global_step // self._updates_per_epoch
        self.sampler.set_epoch(self._epoch)

    def on_step_begin(self, args, state, control, **kwargs):
        self._in_step = True
        self._step_now = state.global_step
        self._step_records = []
        self._micro = (state.global_step - self._epoch * self._updates_per_epoch) * self._accum

    def on_step_end(self, args, state, control, **kwargs):
        self._in_step = False
        step = state.global_step
        if step > self.warmup_steps and step % self.update_every == 0:
            self._update(step)

    def consumed_samples(self, global_step: int) -> int:
        """Global sample index reached after ``global_step`` optimizer steps (counted at the consumer)."""
        n = self.sampler.num_samples
        epoch, within = divmod(global_step, self._updates_per_epoch)
        per_step = self._accum * self._layout.world_size * self._layout.batch_size
        return epoch * n + min(n, within * per_step)

    def _update(self, step: int) -> None:
        stats = self.store.flush(step)
        current = self.sampler.schedule.current
        proposed = np.asarray(self.policy.update(stats, current), dtype=np.float64)
        rejected = not (np.isfinite(proposed).all() and (proposed >= 0).all() and abs(proposed.sum() - 1) < 1e-6)
        if rejected:
            warnings.warn(
                f"policy returned invalid weights {proposed.tolist()} at step {step}; keeping the current mixture",
                stacklevel=2,
            )
            proposed = current
        effective_at = self.consumed_samples(step) + self._lookahead_samples
        self.sampler.schedule.add(effective_at, proposed)
        self.history.append(self._history_entry(step, effective_at))
        self._log(step, proposed, stats, rejected)

    def _log(self, step: int, weights: np.ndarray, stats: DomainStats, rejected: bool) -> None:
        logs: dict[str, float] = {f"dataflex/weight/{n}": float(w) for n, w in zip(self.domain_names, weights)}
        logs["dataflex/entropy"] = entropy(weights)
        logs["dataflex/non_finite"] = float(stats.non_finite)
        logs["dataflex/masked"] = float(stats.masked)
        logs["dataflex/non_finite_total"] = float(self.store.total_non_finite)
        logs["dataflex/rejected_update"] = float(rejected)
        self._emit(step, logs)

    def _emit(self, step: int, logs: dict[str, float]) -> None:
        """Send metrics through Trainer.log (TensorBoard, wandb, log_history), or the logger without one."""
        if self._trainer is not None:
            self._trainer.log(logs)
        else:
            logger.info("step %d: %s", step, logs)

    # -- checkpoints -----------------------------------------------------------------------------------
    def on_save(self, args, state, control, **kwargs):
        payload = self.state_dict(global_step=state.global_step)  # collective: every rank calls it
        if state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(folder):
                write_json_atomic(os.path.join(folder, STATE_FILENAME), payload)
                if self.embeddings is not None:
                    self.embeddings.save(os.path.join(folder, EMBEDDINGS_FILENAME))
            else:
                warnings.warn(f"checkpoint folder {folder} not found; dataflex state not saved", stacklevel=2)
        # No rank may run ahead (and possibly crash and resume) before the state is on disk.
        dist.barrier()

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
        self._hook = None
        self._remove_side_hooks()

    def state_dict(self, global_step: int) -> dict[str, Any]:
        return wrap_state(
            self.sampler.fingerprint,
            {
                "global_step": int(global_step),
                "sampler": self.sampler.state_dict(consumed=0),
                "policy": self.policy.state_dict(),
                "store": self.store.state_dict(),
                "history": self.history,
                "missing_labels": self.missing_labels,
            },
        )

    def load_state_dict(self, state: dict[str, Any], global_step: int) -> None:
        payload = unwrap_state(state, self.sampler.fingerprint)
        if payload["global_step"] != global_step:
            raise ValueError(
                f"dataflex state is from step {payload['global_step']} but the Trainer resumes at step {global_step}"
            )
        # The Trainer skips consumed batches itself, so the sampler must not skip them again.
        self.sampler.load_state_dict(payload["sampler"], restore_position=False)
        self.policy.load_state_dict(payload["policy"])
        self.store.load_state_dict(payload["store"])
        self.history = list(payload["history"])
        self.missing_labels = int(payload["missing_labels"])
        self._checks_left = CHECKS_AFTER_START if self.check_ids else 0


__all__ = ["DataFlexCallback", "STATE_FILENAME"]
