"""The Trainer adapter: one ``TrainerCallback`` that runs any :class:`~dataflex.hf.deciders.Decider`.

What happens, in Trainer events::

    on_train_begin   resolve labels, let the decider build its sampler and put it inside the prepared
                     DataLoader's BatchSampler, hook the model's forward, restore state when resuming
    forward (hook)   per-example loss of each training micro-batch -> ScoreStore (and embeddings, and
                     the decider's observe)
    on_step_end      every ``update_every`` steps after ``warmup_steps``: gather all ranks' records,
                     decide, schedule the decision ``lookahead`` samples ahead, log its metrics
    on_step_end /    when the Trainer is about to save: dataflex's state staged beside the output folder
    on_epoch_end /   (before the Trainer writes and rotates its checkpoints); under save_strategy="best"
    on_evaluate      at every evaluation, since the Trainer decides to save right after it, unannounced
    on_save          the staged state moved into the Trainer's checkpoint folder (one rename)

The pieces each do one job: :mod:`~dataflex.hf.tracking` (which positions a micro-batch holds),
:mod:`~dataflex.hf.capture` (losses from the forward), :mod:`~dataflex.hf.checkpoint` (files),
:mod:`~dataflex.hf.labels` (labels that follow the Trainer's dataset), :mod:`~dataflex.hf.deciders`.

Ownership of the position on resume: the Trainer fast-forwards the DataLoader past consumed batches
itself (``skip_first_batches``), so the sampler restores its schedule and epoch but *not* its
position; it regenerates the epoch from position 0 and the Trainer discards what was already trained.

Logging: metrics go through ``Trainer.log`` (console, ``log_history``, TensorBoard, wandb). That call
clears the Trainer's ``should_log`` flag; the adapter restores it, so the Trainer still logs its own
loss, grad norm and learning rate at exactly the steps it would have without dataflex.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from transformers import Trainer, TrainerCallback

from dataflex import dist
from dataflex.batching import inspect_loader
from dataflex.call_stack import caller_self
from dataflex.checks import flag, is_whole, seed_number
from dataflex.domains import encode_domains
from dataflex.dynamics import TrainingDynamics
from dataflex.embeddings import last_hidden_tap, mean_pool
from dataflex.hf import checkpoint
from dataflex.hf.capture import LossCapture
from dataflex.hf.deciders import Decider, RunContext
from dataflex.hf.labels import class_names, resolve_labels
from dataflex.hf.lengths import example_lengths
from dataflex.hf.loss_scale import custom_loss_multiplier
from dataflex.hf.metric_names import check_domain_metric_names
from dataflex.hf.tracking import BatchTracker
from dataflex.losses import check_causal_lm, padding_free_segments
from dataflex.run_folder import constructor_settings, describe_differences
from dataflex.samplers.base import ScheduledSampler
from dataflex.samplers.length import LengthGrouping, default_megabatch
from dataflex.state import unwrap_state, wrap_state
from dataflex.store import ScoreStore
from dataflex.taps import Tap
from dataflex.vlm import check_image_batch, image_feature_tap, image_token_id, pool_image_features
from dataflex.weights import lists_may_follow

__all__ = ["TrainerAdapter"]

logger = logging.getLogger(__name__)

#: The TRL trainers dataflex supports (by class name, so TRL need not be installed): their training forward is one
#: language-model loss per dataset row (KTOTrainer's scores each row's completion; tests/test_trl.py). Every other
#: TRL trainer is refused, TRL's own subclasses of these included (GKDTrainer and GOLDTrainer subclass SFTTrainer
#: and distil on completions they generate); a user's own subclass of these is accepted.
SUPPORTED_TRL_TRAINERS = ("SFTTrainer", "KTOTrainer")
#: Why the TRL trainers users ask about most do not fit; others get a general reason.
_PAIRS = "puts the chosen and the rejected completion of every example into one batch (two rows per example)"
_GENERATED = "not on the dataset's rows"
UNSUPPORTED_TRAINERS = {
    **dict.fromkeys(("DPOTrainer", "ORPOTrainer", "CPOTrainer"), f"{_PAIRS} and trains a preference loss"),
    "RewardTrainer": "trains a sequence-classification reward model on chosen/rejected pairs, without a "
    "language-model loss per example",
    **dict.fromkeys(
        ("GRPOTrainer", "RLOOTrainer"), f"trains on completions it generates (several per prompt), {_GENERATED}"
    ),
    "OnlineDPOTrainer": f"trains on completions it generates, {_GENERATED}",
    **dict.fromkeys(("GKDTrainer", "GOLDTrainer"), f"distils a teacher on completions it generates, {_GENERATED}"),
    "DistillationTrainer": "trains on a teacher's distributions (and completions it may generate), not on a "
    "language-model loss of the dataset's rows",
}
#: Samplers the Trainer (or accelerate) builds itself, by class name: dataflex's sampler replaces them. Any other
#: comes from a user's ``_get_train_sampler`` override, whose order would be dropped without a word.
STOCK_SAMPLERS = ("RandomSampler", "SequentialSampler", "SeedableRandomSampler", "LengthGroupedSampler")
CHECKS_AFTER_START = 4  # micro-batches whose input_ids are compared with the dataset after (re)start


def _trainer_on_stack() -> Trainer | None:
    """The Trainer running this event, read off the call stack (fallback when none was attached)."""
    return caller_self(lambda owner: isinstance(owner, Trainer))


def model_to_call(trainer: Trainer | None, model: torch.nn.Module) -> torch.nn.Module:
    """The model dataflex runs between training steps (selection's and the curriculum's scoring passes).

    Callbacks get the model the Trainer was given. Under FSDP1 the Trainer trains an FSDP wrapper around it, and
    FSDP1 gathers the weights in the wrapper's forward: the inner model, called directly, runs on whatever views of
    the flat parameters its modules hold then (in a model wrapped by hand with torch's defaults, shards: a shape
    error; in the Trainer runs of the tests, the whole current weights). FSDP2 shards the model in place, so the
    two are one."""
    if trainer is not None and getattr(trainer, "is_fsdp_enabled", False):
        return trainer.model
    return model


def _describe(batching: dict[str, int]) -> str:
    return (
        f"{batching.get('world_size')} process(es) x per-device batch {batching.get('per_device_batch')} x "
        f"gradient accumulation {batching.get('gradient_accumulation_steps')}"
    )


class TrainerAdapter(TrainerCallback):
    """Runs ``decider`` inside a stock ``transformers.Trainer``; see the module docstring.

    The public callbacks (:class:`~dataflex.hf.DataFlexCallback`, ``DataFlexSelectCallback``,
    ``DataFlexCurriculumCallback``) are this class with their decider; their docstrings list the arguments.
    """

    #: Record the size and CRC-32 of the Trainer's checkpoint files at each save and check them before a resume
    #: (:mod:`dataflex.hf.trainer_files`); set False on a callback whose checkpoints are too large to read back.
    verify_trainer_files: bool = True

    def __init__(
        self,
        decider: Decider,
        *,
        labels: Sequence[Any] | None,
        label_column: str | None,
        labels_required: bool,
        warmup_steps: int,
        seed: int | None,
        lookahead_batches: int | None,
        check_ids: bool,
        allow_missing_state: bool,
        embeddings: Any,
        embeddings_from: Literal["text", "image"],
        check_images: bool,
        trainer: Trainer | None,
        dynamics: bool = False,
    ) -> None:
        update_every = decider.update_every
        if update_every is not None and (not is_whole(update_every) or update_every < 1):
            raise ValueError(f"update_every must be a positive integer; got {update_every!r}")
        if not is_whole(warmup_steps) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0; got {warmup_steps!r}")
        if lookahead_batches is not None and (not is_whole(lookahead_batches) or lookahead_batches < 1):
            raise ValueError(f"lookahead_batches must be a positive integer; got {lookahead_batches!r}")
        check_ids, allow_missing_state = flag("check_ids", check_ids), flag("allow_missing_state", allow_missing_state)
        check_images, dynamics = flag("check_images", check_images), flag("dynamics", dynamics)
        seed = None if seed is None else seed_number("seed", seed)
        if embeddings_from not in ("text", "image"):
            raise ValueError(f"embeddings_from must be 'text' or 'image'; got {embeddings_from!r}")
        self.decider = decider
        self.labels = None if labels is None else list(labels)
        self.label_column, self.labels_required = label_column, labels_required
        self.warmup_steps, self.seed, self.lookahead_batches = warmup_steps, seed, lookahead_batches
        self.check_ids, self.allow_missing_state = bool(check_ids), bool(allow_missing_state)
        self.embeddings, self.embeddings_from, self.check_images = embeddings, embeddings_from, bool(check_images)
        #: Every scheduled decision: dicts with step, effective_at and what the decider records.
        self.history: list[dict[str, Any]] = []
        self.domain_names: list[str] = []
        self.sampler: ScheduledSampler | None = None
        self.store: ScoreStore | None = None
        self.run: RunContext | None = None
        self.tracker: BatchTracker | None = None
        self.capture = LossCapture(self._on_micro_batch)
        #: Per-example training dynamics (dataflex.dynamics), kept when ``dynamics=True`` or the decider needs
        #: them (``decider.needs_dynamics``); built in on_train_begin.
        self.dynamics: TrainingDynamics | None = None
        self.keep_dynamics = bool(dynamics) or bool(getattr(decider, "needs_dynamics", False))
        self._trainer: Trainer | None = None
        self._attached = False  # _trainer was given (attach / trainer=), not found on the call stack
        self._taps: list[Tap] = []
        self._embedding_tap: Tap | None = None
        # This rank's embedding updates since the last gather (multi-process runs): (step, ids, embeddings).
        self._embedding_updates: list[tuple[int, np.ndarray, np.ndarray]] = []
        self._pre_hook: torch.utils.hooks.RemovableHandle | None = None
        self._step_records: list[tuple[np.ndarray, torch.Tensor, torch.Tensor]] = []
        self._step_now = 0
        self._checks_left = 0
        self._in_training = False  # between on_train_begin and on_train_end (evaluations outside do not stage)
        self._staged_step = -1  # global step whose state is staged for the Trainer's next checkpoint
        self._batching: dict[str, int] = {}  # processes and batch sizes: the step <-> sample mapping
        self._settings: dict[str, Any] = {}  # what decides the data (_decision_settings), from on_train_begin
        self._warned: set[str] = set()  # no-signal conditions already reported
        self._log_metrics: list[Any] = []  # callables giving metrics for the Trainer's logging steps
        if trainer is not None:
            self.attach(trainer)

    # -- the Trainer, explicitly ---------------------------------------------------------------
    def attach(self, trainer: Trainer) -> TrainerAdapter:
        """Bind this callback to ``trainer`` (and add it to the trainer's callbacks if it is not there).

        Dataflex then logs through ``trainer.log``, reads labels from ``trainer.train_dataset`` and knows
        which checkpoint ``trainer.train(resume_from_checkpoint=...)`` resumes from.
        """
        if not isinstance(trainer, Trainer):
            raise TypeError(f"attach() needs a transformers.Trainer (or a subclass); got {type(trainer).__name__}")
        self._trainer, self._attached = trainer, True
        if not any(cb is self for cb in trainer.callback_handler.callbacks):
            trainer.add_callback(self)
        checkpoint.record_resume_requests(trainer)
        checkpoint.barrier_after_rank_files(trainer)
        return self

    def _find_trainer(self) -> Trainer | None:
        running = _trainer_on_stack()
        if self._trainer is not None and running is not None and running is not self._trainer:
            # One callback object reused for a second Trainer: labels, logs and the resumed checkpoint would come
            # from the first (a stale cache trained a Static({"code": 1}) mixture on every domain).
            if self._attached:
                raise ValueError(
                    f"this {type(self).__name__} is attached to another {type(self._trainer).__name__} than the one "
                    f"now training; attach it to this one (callback.attach(trainer)) or make one callback per Trainer"
                )
            self._trainer = None  # found on the stack for an earlier Trainer: find this one
        if self._trainer is not None:
            return self._trainer
        trainer = running
        if trainer is not None:
            warnings.warn(
                f"{type(self).__name__} was not attached to its Trainer and found it on the call stack; call "
                f"callback.attach(trainer) (or pass trainer=) so labels, logging and resume use it explicitly",
                stacklevel=3,
            )
            self._trainer = trainer
        return trainer

    # -- read-outs -------------------------------------------------------------------------------
    @property
    def missing_labels(self) -> int:
        """Training forwards that had no labels and could not be scored."""
        return self.capture.missing_labels

    def last_step_records(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This rank's (example ids, per-example losses, valid mask) of the current/last optimizer step."""
        if not self._step_records:
            return np.zeros(0, np.int64), np.zeros(0), np.zeros(0, bool)
        ids = np.concatenate([r[0] for r in self._step_records])
        loss = torch.cat([r[1].float() for r in self._step_records]).cpu().numpy()
        has = torch.cat([r[2] for r in self._step_records]).cpu().numpy()
        return ids, loss, has & np.isfinite(loss)

    def current_ids(self) -> np.ndarray | None:
        """Example ids of the micro-batch whose loss the Trainer is computing through ``wrap_loss``; None when
        that loss is not a scored training micro-batch's (an evaluation forward)."""
        if not (self.capture.loss_call_scored and self._step_records):
            return None
        return self._step_records[-1][0]

    def add_log_metrics(self, metrics: Any) -> None:
        """Log ``metrics()`` (a dict) with dataflex's entries at the Trainer's logging steps."""
        self._log_metrics.append(metrics)

    def wrap_loss(self, loss_func: Any) -> Any:
        """A ``compute_loss_func`` that lets dataflex see the labels, then calls ``loss_func``.

        With ``compute_loss_func`` set, the Trainer pops ``labels`` before the forward, so the forward
        hook cannot score the batch. Pass ``Trainer(compute_loss_func=callback.wrap_loss(my_loss))``.
        """
        return self.capture.wrap_loss(loss_func)

    # -- setup -----------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, optimizer=None, **kwargs):
        if train_dataloader is None or model is None:
            raise RuntimeError(
                f"{type(self).__name__} needs the Trainer's model and train_dataloader in on_train_begin"
            )
        trainer = self._find_trainer()
        if trainer is not None and sum(cb is self for cb in trainer.callback_handler.callbacks) > 1:
            raise RuntimeError(f"this {type(self).__name__} was added to the Trainer twice; add it once")
        callbacks = trainer.callback_handler.callbacks if trainer is not None else []
        others = [cb for cb in callbacks if isinstance(cb, TrainerAdapter)]
        if len(others) > 1:  # each installs its own sampler: the last would silently replace the others'
            raise ValueError(
                f"the Trainer has {len(others)} dataflex callbacks ({', '.join(type(cb).__name__ for cb in others)}); "
                "each one replaces the Trainer's sampler with its own, so only one can decide the order: keep one "
                "(to mix domains within a selected subset, select it offline with dataflex.offline and train the "
                "mixture on dataset.select(subset))"
            )
        self._check_stack_settings(args, model)
        self._check_parallelism(args, trainer)
        self._check_trainer_kind(trainer)
        self._check_positional_inputs(args, trainer)
        check_causal_lm(model)  # every loss dataflex computes shifts the labels by one
        self._configure_wrapped_loss(args, trainer, model)
        smoother = getattr(trainer, "label_smoother", None)
        if smoother is not None and getattr(trainer, "compute_loss_func", None) is None:  # (a loss function wins)
            trainer.label_smoother = self.capture.wrap_label_smoother(smoother)  # the labels leave the forward
        if trainer is not None:
            checkpoint.barrier_after_rank_files(trainer)
        self._in_training = True
        layout = inspect_loader(train_dataloader)
        replaced = layout.batch_sampler.sampler
        if not isinstance(replaced, ScheduledSampler) and type(replaced).__name__ not in STOCK_SAMPLERS:
            raise ValueError(
                f"the Trainer's DataLoader draws with a {type(replaced).__name__} (a _get_train_sampler override?), "
                "which dataflex's sampler would replace, dropping its order without a word; remove the override and "
                f"let dataflex decide the order (samplers it replaces: {', '.join(STOCK_SAMPLERS)})"
            )
        dataset = train_dataloader.dataset
        trainer_dataset = getattr(trainer, "train_dataset", None)
        labels = resolve_labels(
            loader_dataset=dataset,
            trainer_dataset=trainer_dataset,
            given=self.labels,
            column=self.label_column,
            required=self.labels_required,
        )
        domain_ids, self.domain_names = encode_domains(labels)
        check_domain_metric_names(self.domain_names, callbacks)  # before a reporter could merge two domains' metrics
        n = len(dataset)
        accum = args.gradient_accumulation_steps
        folder = None
        if state.global_step > 0:
            folder = checkpoint.resume_folder(trainer, args.output_dir, state.global_step)
            self._check_resumable(folder, state.global_step, model)
        self.run = RunContext(
            model=model_to_call(trainer, model),
            dataset=dataset,
            collate=train_dataloader.collate_fn,
            optimizer=optimizer,
            domain_ids=domain_ids,
            domain_names=self.domain_names,
            seed=self._sampler_seed(args),
            num_samples=n,
            samples_per_step=layout.batch_size * layout.world_size * accum,
            max_steps=state.max_steps,
            resuming=folder is not None and checkpoint.has_state(folder),
            warmup_steps=self.warmup_steps,
        )
        declared = class_names(loader_dataset=dataset, trainer_dataset=trainer_dataset, column=self.label_column)
        with lists_may_follow(declared, f"the {self.label_column!r} column's ClassLabel"):
            self.sampler = self.decider.build_sampler(self.run)
        self._settings = self._decision_settings()  # (read after bind, before any state is restored or trained)
        grouping = None
        if getattr(args, "train_sampling_strategy", "random") == "group_by_length":
            grouping = self._length_grouping(args, trainer, dataset, self.run.samples_per_step)
            self.sampler.group_by_length(grouping)
        layout.batch_sampler.sampler = self.sampler
        self.store = ScoreStore(domain_ids, len(self.domain_names))
        self.dynamics = TrainingDynamics(n) if self.keep_dynamics else None
        self.run.dynamics = self.dynamics
        self.capture.record_visits = self.dynamics is not None
        # A length-sorted block is fixed before its first batch trains: decisions land after the current block.
        block_batches = 0 if grouping is None else -(-grouping.megabatch // (layout.batch_size * layout.world_size))
        self.tracker = BatchTracker.from_layout(layout, n, accum, self.lookahead_batches, block_batches)
        self._batching = {
            "world_size": layout.world_size,
            "per_device_batch": layout.batch_size,
            "gradient_accumulation_steps": accum,
        }
        self._checks_left = CHECKS_AFTER_START if self.check_ids else 0
        self._attach_hooks(model)
        # A new training run: the Trainer calls on_train_begin again when it retries with a smaller batch
        # (auto_find_batch_size after an out-of-memory error), as does a second train() call; nothing of the
        # earlier attempt may stay (its decisions, counts, step records, embedding updates or staged step). A
        # resume restores what it saved.
        self.history, self._step_records, self._embedding_updates, self._staged_step = [], [], [], -1
        self.capture.missing_labels = 0
        if self.embeddings is not None and not self.run.resuming:
            self.embeddings.reset()  # (a retry's failed attempt filled it from a model the run no longer has)
        if self.run.resuming:
            if getattr(args, "ignore_data_skip", False):
                # The Trainer would restart the epoch instead of skipping its consumed batches, so the resumed
                # run would train on other examples than the interrupted one (dataflex's id check then stops it
                # with a message that blames the sampler); say what is wrong instead.
                raise ValueError(
                    "ignore_data_skip=True: on resume the Trainer would restart the epoch instead of skipping the "
                    f"batches it already trained on (step {state.global_step}), so the run would repeat examples "
                    "and dataflex's decisions would land on other samples; resume with ignore_data_skip=False "
                    "(the default)"
                )
            self._restore(folder, state.global_step)
        if not self.history:
            self.history.append(self._history_entry(0, 0))
        if 0 < state.max_steps <= state.global_step:
            # Resumed from the run's final checkpoint (a rerun after a crash between the last save and the
            # script's end): the Trainer would still train one step past max_steps before it checks the step
            # count (seen with transformers 5.25), consuming a batch and changing the optimizer and decisions.
            # No batch is left to train on, and the Trainer stops after the (empty) epoch.
            layout.batch_sampler.sampler = []
            control.should_training_stop = True
            logger.info("resumed at global_step=%d = max_steps: the run is already finished", state.global_step)

    def _check_stack_settings(self, args: Any, model: torch.nn.Module) -> None:
        """Trainer settings dataflex cannot honour: refuse or say so, never replace them silently."""
        quantized = getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False)
        if getattr(args, "n_gpu", 1) > 1 and not quantized:
            # The Trainer's condition for torch.nn.DataParallel. Its replicas share the model's forward hooks and
            # run them at once on threads, one slice of the batch each, so the loss capture would see each
            # micro-batch as several forwards of unknown order and pin losses on the wrong examples.
            raise ValueError(
                f"the Trainer would run the model under torch.nn.DataParallel ({args.n_gpu} GPUs in one process), "
                "whose replicas each forward a slice of the batch on their own thread, so dataflex could not tell "
                "which losses belong to which examples; launch one process per GPU (torchrun --nproc_per_node "
                f"{args.n_gpu} or accelerate launch --multi_gpu), which dataflex supports, or make one GPU visible "
                "(CUDA_VISIBLE_DEVICES=0)"
            )
        if getattr(args, "packing", False):
            raise ValueError(
                "dataset-level packing (packing=True) puts several examples into one training row, so dataflex cannot "
                "mix, select or order examples; use padding-free batches instead (padding_free=True, packing=False), "
                "which keep one example per sequence and are supported"
            )
        strategy = getattr(args, "train_sampling_strategy", "random")
        if strategy == "batch_rebalance":
            raise ValueError(
                "train_sampling_strategy='batch_rebalance' builds its own batches, which dataflex's sampler would "
                "replace; use train_sampling_strategy='random' with dataflex"
            )
        if strategy == "sequential":
            warnings.warn(
                f"train_sampling_strategy='sequential' is replaced by dataflex's {type(self.decider).__name__} "
                "sampler: batches follow dataflex's order, not the dataset's",
                stacklevel=3,
            )
        elif strategy not in ("random", "group_by_length"):
            raise ValueError(
                f"train_sampling_strategy={strategy!r} is not supported with dataflex; use 'random' or "
                "'group_by_length' (length-sorted blocks of dataflex's order)"
            )
        # ExampleWeightedLoss divides by the accumulation it was given (the Trainer leaves a custom loss undivided):
        # another count than the Trainer's scales every gradient by their ratio, which clipping then distorts.
        loss_accumulation = getattr(self.capture.wrapped_loss, "accumulation", None)
        if loss_accumulation is not None and loss_accumulation != args.gradient_accumulation_steps:
            raise ValueError(
                f"{type(self.capture.wrapped_loss).__name__}(gradient_accumulation_steps={loss_accumulation}) but the "
                f"Trainer accumulates {args.gradient_accumulation_steps} micro-batches per step: every gradient would "
                f"be scaled by {args.gradient_accumulation_steps / loss_accumulation:g}; give both the same value"
            )

    def _sampler_seed(self, args: Any) -> int:
        """The callback's ``seed``, else the Trainer's data seed as its own sampler takes it: ``data_seed`` when
        set, else ``seed``. (Reading ``seed`` alone, a sweep over ``data_seed`` got one data order for all.)"""
        if self.seed is not None:
            return self.seed
        data_seed = getattr(args, "data_seed", None)
        return int(args.seed if data_seed is None else data_seed)

    def _configure_wrapped_loss(self, args: Any, trainer: Trainer | None, model: torch.nn.Module) -> None:
        """What a dataflex loss given to ``wrap_loss`` cannot see for itself: a loss that averages over its own
        micro-batch (``trainer_scale``, e.g. ExampleWeightedLoss) learns the factor the Trainer multiplies it by
        (:mod:`dataflex.hf.loss_scale`) and the image token it must leave out like the scores do
        (``ignored_label``); one that does not smooth (``smooths_labels = False``) refuses a label smoothing the
        Trainer would then drop."""
        loss = self.capture.wrapped_loss
        if hasattr(loss, "ignored_label"):
            loss.ignored_label = image_token_id(model)
        if hasattr(loss, "step_micro_batches") and trainer is not None:
            # The Trainer sets this before each optimizer step's micro-batches (fewer in an epoch's short last step).
            loss.step_micro_batches = lambda: int(
                getattr(trainer, "current_gradient_accumulation_steps", None) or args.gradient_accumulation_steps
            )
        smoothing = float(getattr(args, "label_smoothing_factor", 0.0) or 0.0)
        if loss is not None and getattr(loss, "smooths_labels", True) is False and smoothing > 0:
            # With a compute_loss_func the Trainer (and TRL's SFTTrainer) skips its label smoother.
            raise ValueError(
                f"label_smoothing_factor={smoothing:g} would not be applied: with a compute_loss_func the Trainer "
                f"skips its label smoother, and {type(loss).__name__} does not smooth labels; set "
                "label_smoothing_factor=0 to train on its weighted cross-entropy"
            )
        if loss is None or not hasattr(loss, "trainer_scale"):
            return
        scale = custom_loss_multiplier(trainer) if trainer is not None else None
        if scale is None:
            if int(getattr(args, "world_size", 1)) > 1:
                import transformers

                raise ValueError(
                    f"{type(loss).__name__} in a {args.world_size}-process run needs "
                    + (
                        f"transformers >= 4.50 (this is {transformers.__version__}): how older Trainers rescale a "
                        "custom loss across processes is not known to dataflex, so every gradient could be off by "
                        "the process count"
                        if trainer is not None
                        else "the Trainer: pass trainer= to the callback or call callback.attach(trainer)"
                    )
                )
            scale = 1
        loss.trainer_scale = scale

    @staticmethod
    def _check_parallelism(args: Any, trainer: Trainer | None) -> None:
        """Refuse tensor, context and sequence parallelism (accelerate's ``ParallelismConfig`` from the
        TrainingArguments or an accelerate config file; a model loaded with a ``tp_plan``; DeepSpeed's AutoTP):
        dataflex deals whole examples to data-parallel ranks and scores each on the rank that trained it."""
        config = getattr(getattr(trainer, "accelerator", None), "parallelism_config", None)
        config = config if config is not None else getattr(args, "parallelism_config", None)
        sizes = {name: int(getattr(config, name, None) or 1) for name in ("tp_size", "cp_size", "sp_size")}
        if hasattr(trainer, "get_tp_size"):  # the Trainer's own reading: the model's plan, DeepSpeed, accelerate
            sizes["tp_size"] = max(sizes["tp_size"], int(trainer.get_tp_size() or 1))
        split = {name: size for name, size in sizes.items() if size > 1}
        if split:
            shown = ", ".join(f"{name}={size}" for name, size in split.items())
            raise ValueError(
                f"this run splits the model or the sequence over ranks ({shown}): the ranks of a tensor-parallel "
                "group train the same examples, and context or sequence parallelism gives each rank a slice of "
                "every sequence, so dataflex would count an example once per rank or score it from part of its "
                "tokens; dataflex supports data parallelism only "
                "(DDP, DeepSpeed ZeRO): set tp_size, cp_size and sp_size to 1"
            )

    @staticmethod
    def _check_trainer_kind(trainer: Trainer | None) -> None:
        """Refuse trainers whose batches dataflex would attribute to the wrong examples (or cannot score): every
        TRL trainer but the supported ones, judged by the most derived TRL class (a user's subclass of a
        supported trainer is one; TRL's own subclasses of it are not)."""
        classes = type(trainer).__mro__ if trainer is not None else ()
        own = next((cls for cls in classes if cls.__module__.split(".")[0] == "trl"), None)
        if own is None or own.__name__ in SUPPORTED_TRL_TRAINERS:
            return
        reason = next((UNSUPPORTED_TRAINERS[c.__name__] for c in classes if c.__name__ in UNSUPPORTED_TRAINERS), None)
        raise ValueError(
            f"dataflex does not support TRL's {own.__name__}: "
            + (f"it {reason}" if reason else "dataflex has not been checked with it, and its batches need not be one "
               "language-model loss per dataset row")
            + ", while dataflex samples dataset rows and scores one language-model loss per row. Supported: "
            f"transformers.Trainer (and subclasses), TRL's {' and '.join(SUPPORTED_TRL_TRAINERS)}"
        )  # fmt: skip

    def _check_positional_inputs(self, args: Any, trainer: Trainer | None) -> None:
        """Inputs given by position (subset ids, per-example arrays) index the dataset the user built: a TRL
        trainer that shuffles it or drops rows of it afterwards would move each to another example, silently."""
        held = getattr(self.decider, "positional_input", None)
        if held is None or trainer is None:
            return
        name = type(trainer).__name__
        if getattr(args, "shuffle_dataset", False):
            raise ValueError(
                f"{held} are given by position in the training set, but shuffle_dataset=True makes {name} shuffle "
                "its dataset after they were made, so each would land on another example; set "
                "shuffle_dataset=False (dataflex's sampler decides the order anyway)"
            )
        dataset = getattr(trainer, "train_dataset", None)
        built_from = getattr(getattr(dataset, "data", None), "num_rows", None)  # the arrow table under a view
        from_trl = any(cls.__module__.split(".")[0] == "trl" for cls in type(trainer).__mro__)
        if from_trl and getattr(dataset, "_indices", None) is not None and built_from and len(dataset) < built_from:
            raise ValueError(
                f"{held} are given by position in the training set, but {name}'s holds {len(dataset)} of the "
                f"{built_from} rows it was built from (TRL drops rows left without a counted token, e.g. a "
                "completion cut off by max_length), so after the first dropped row each would land on another "
                "example; drop those rows yourself before building the trainer (then dataset.flatten_indices()) so "
                "the positions stay those of your dataset"
            )

    def _length_grouping(self, args: Any, trainer: Trainer | None, dataset: Any, per_step: int) -> LengthGrouping:
        """Stock ``group_by_length`` applied to dataflex's order: blocks of the stock size sorted by length."""
        processing = getattr(trainer, "processing_class", None)
        names = getattr(processing, "model_input_names", None) or ["input_ids"]
        lengths = example_lengths(
            loader_dataset=dataset,
            trainer_dataset=getattr(trainer, "train_dataset", None),
            length_column=getattr(args, "length_column_name", "length"),
            input_name=names[0],
        )
        return LengthGrouping(lengths, default_megabatch(len(dataset), per_step))

    def _attach_hooks(self, model: torch.nn.Module) -> None:
        self._detach_hooks()
        self.capture.attach(model)
        self.capture.ignored_label = image_token_id(model)
        if self.embeddings is not None:
            self._embedding_tap = (image_feature_tap if self.embeddings_from == "image" else last_hidden_tap)(model)
            self._taps.append(self._embedding_tap.attach())
        if self.check_images and image_token_id(model) is not None:
            self._pre_hook = model.register_forward_pre_hook(self._before_forward, with_kwargs=True)

    def _detach_hooks(self) -> None:
        self.capture.detach()
        for tap in self._taps:
            tap.detach()
        self._taps, self._embedding_tap = [], None
        if self._pre_hook is not None:
            self._pre_hook.remove()
            self._pre_hook = None

    def _decision_settings(self) -> dict[str, Any]:
        """What decides this run's data, as JSON: the decider's knobs (its policy, selector or curriculum with its
        own), the decision cadence, the warm-up and the callback's seed. Saved with the state and compared on
        resume; the record's form is kept as first saved (2026-12), so checkpoints written since still resume.
        (The seed and the sampler's own settings are also compared by the sampler's state, which names them
        first; a mixing or selection decider's cadence shows twice, as its knob and as ``update_every``.)"""
        # (JSON kept to a few kB: a long knob by its digest; how many examples are scored at once decides nothing)
        knobs = constructor_settings(self.decider, nested=True, max_chars=1024)
        knobs.pop("score_batch_size", None)
        return {
            "decider": {"class": type(self.decider).__qualname__, **knobs},
            "update_every": self.decider.update_every,
            "warmup_steps": self.warmup_steps,
            "seed": self.seed,
        }

    def _history_entry(self, step: int, effective_at: int) -> dict[str, Any]:
        return {"step": step, "effective_at": effective_at, **self.decider.history_entry(self.sampler)}

    # -- every training micro-batch ------------------------------------------------------------
    def _on_micro_batch(
        self, inputs: dict[str, Any], loss: torch.Tensor, has_tokens: torch.Tensor, visits: Any = None
    ) -> None:
        ids = self.sampler.ids_at(self.tracker.epoch, self.tracker.take())
        labels = inputs["labels"]
        if loss.shape[0] != ids.shape[0]:
            raise RuntimeError(
                f"the batch holds {loss.shape[0]} examples but dataflex expected {ids.shape[0]} at micro-batch "
                f"{self.tracker.micro - 1}; was the DataLoader rebuilt after on_train_begin, or does the collator "
                "pack several examples into one sequence?"
            )
        flattened = labels.shape[0] != ids.shape[0]  # a padding-free batch: all examples in one row
        if flattened and (self._embedding_tap is not None or self.decider.observes_batches):
            raise NotImplementedError(
                "embeddings and online DoReMi need one example per row; padding-free batches are supported for "
                "mixing, selection, curricula and reweighting only"
            )
        if self._checks_left > 0:
            self._check_ids(ids, inputs)
        self.store.add(ids, loss, has_tokens)
        if visits is not None and self.dynamics is not None:
            self.dynamics.add(ids, self._step_now, visits)
        self._step_records.append((ids, loss, has_tokens))
        if self._embedding_tap is not None:
            self._record_embeddings(ids, inputs)
        if self.decider.observes_batches:
            batch = {k: inputs[k] for k in ("input_ids", "attention_mask", "labels") if inputs.get(k) is not None}
            self.decider.observe(batch, torch.as_tensor(self.run.domain_ids[ids], device=labels.device))

    def _record_embeddings(self, ids: np.ndarray, inputs: dict[str, Any]) -> None:
        value = self._embedding_tap.pop()
        if value is None:
            return
        if self.embeddings_from == "image":
            value = pool_image_features(self.run.model, value, inputs)
            if value.shape[0] != ids.shape[0]:
                raise RuntimeError(
                    f"embeddings_from='image' needs one image per example; this batch has {value.shape[0]} "
                    f"images for {ids.shape[0]} examples"
                )
            pooled = value
        else:
            pooled = mean_pool(value.detach().float(), inputs.get("attention_mask"))
        self.embeddings.update(ids, pooled, step=self._step_now)
        if dist.world_size() > 1:
            self._embedding_updates.append((self._step_now, ids.copy(), pooled.detach().float().cpu().numpy()))

    def _gather_embeddings(self) -> None:
        """Apply every rank's embedding updates on every rank, in (step, rank) order (collective): each rank
        only sees its own examples, and the cache is saved by rank 0 and restored on all."""
        if self.embeddings is None or dist.world_size() == 1:
            return
        local, self._embedding_updates = self._embedding_updates, []
        updates = [
            (step, r, k, ids, emb)
            for r, part in enumerate(dist.all_gather_objects(local))
            for k, (step, ids, emb) in enumerate(part)
        ]
        for step, _, _, ids, emb in sorted(updates, key=lambda u: u[:3]):
            self.embeddings.update(ids, emb, step=step)

    def _before_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """VLM batches: refuse a training batch whose images are missing or malformed, naming its examples."""
        if not self.capture.is_training_forward(module):
            return
        positions = self.tracker.peek()
        ids = None if positions is None else self.sampler.ids_at(self.tracker.epoch, positions).tolist()
        check_image_batch(module, kwargs, ids)

    def _check_ids(self, ids: np.ndarray, inputs: dict) -> None:
        self._checks_left -= 1
        batch_ids = inputs.get("input_ids")
        try:
            expected = self.run.dataset[int(ids[0])].get("input_ids")
        except Exception:  # a dataset without input_ids (or a custom one): nothing to check against
            return
        if batch_ids is None or expected is None:
            return
        row = batch_ids[0]
        segments = padding_free_segments(batch_ids.shape[0], inputs.get("position_ids"))
        mask = inputs.get("attention_mask")
        if segments is not None:  # a padding-free row: its first sequence is the first example
            row = row[segments[0] == 0]
        elif mask is not None:
            row = row[mask[0].bool()]
        expected_t = torch.as_tensor(expected, device=row.device)
        if row.shape != expected_t.shape or not torch.equal(row, expected_t):
            raise RuntimeError(
                f"dataflex believes the first example of this batch is id {int(ids[0])}, but the batch's input_ids "
                "differ from that example's. The DataLoader's sampler was changed after dataflex installed its "
                "own, or the collator rewrites tokens (pass check_ids=False if it does so on purpose)"
            )

    # -- the control loop ------------------------------------------------------------------------
    def on_epoch_begin(self, args, state, control, **kwargs):
        self.sampler.set_epoch(self.tracker.start_epoch(state.global_step))

    def on_step_begin(self, args, state, control, **kwargs):
        self.capture.active = True
        self._step_now = state.global_step
        self._step_records = []
        self.tracker.start_step(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self.capture.active = False
        step, every = state.global_step, self.decider.update_every
        logs = {}
        if every is not None and step > self.warmup_steps and step % every == 0:
            logs = self._update(step)
        if control.should_log:  # metrics of added sources (token weighting) at the Trainer's logging steps
            logs |= {k: v for metrics in self._log_metrics for k, v in metrics().items()}
        if logs:
            self._log(step, logs, control)  # one dataflex entry per step
        if control.should_save:  # the Trainer saves right after this event: stage our state first
            self._stage(args, state)

    def consumed_samples(self, global_step: int) -> int:
        """Global sample index reached after ``global_step`` optimizer steps (counted at the consumer)."""
        return self.tracker.consumed_samples(global_step)

    def _update(self, step: int) -> dict[str, float]:
        stats = self.store.flush(step)
        if self.dynamics is not None:
            self.dynamics.gather()  # collective, as the flush: every rank decides on the same record
        self._gather_embeddings()
        self._warn_without_signal(stats, step)
        value, logs = self.decider.decide(step, stats, self.store, self.run)
        effective_at = self.tracker.effective_at(step)
        self.sampler.schedule.add(effective_at, value)
        self.history.append(self._history_entry(step, effective_at))
        return logs

    def _warn_without_signal(self, stats: Any, step: int) -> None:
        """Say so (once per condition) when a decision is taken on little or no signal."""
        total = int(stats.count.sum()) + stats.non_finite + stats.masked
        conditions = []
        if total and stats.non_finite > total / 2:
            conditions.append(("non_finite", f"{stats.non_finite} of {total} examples had a NaN/Inf loss"))
        if total and stats.masked > total / 2:
            conditions.append(("masked", f"{stats.masked} of {total} examples had no label token (all -100)"))
        if stats.non_finite and "parameters" not in self._warned:
            bad = next((n for n, p in self.run.model.named_parameters() if not torch.isfinite(p).all()), None)
            if bad is not None:
                conditions.append(("parameters", f"the model's parameters are not finite (first: {bad})"))
        for key, what in conditions:
            if key in self._warned:
                continue
            self._warned.add(key)
            message = (
                f"dataflex at step {step}: {what}; {type(self.decider).__name__} decides on the rest, which may be "
                "nothing (then the previous decision stands). Check the learning rate, the data and the labels"
            )
            logger.warning(message)
            warnings.warn(message, stacklevel=2)

    def _log(self, step: int, logs: dict[str, float], control: Any) -> None:
        """Send metrics through Trainer.log without costing the Trainer its own log entry of this step."""
        if self._trainer is None:
            logger.info("step %d: %s", step, logs)
            return
        should_log = control.should_log
        # The base class's log, not a subclass override: TRL's SFTTrainer.log merges (and then clears) its own
        # pending metrics into whatever entry is logged, which would move them into dataflex's entry.
        Trainer.log(self._trainer, dict(logs))  # its on_log event clears should_log ...
        control.should_log = should_log  # ... which the Trainer reads right after on_step_end
        self._trainer.control.should_log = should_log

    # -- checkpoints -----------------------------------------------------------------------------
    def on_epoch_end(self, args, state, control, **kwargs):
        if control.should_save:  # save_strategy="epoch": the Trainer saves after this event
            self._stage(args, state)

    def on_evaluate(self, args, state, control, **kwargs):
        # save_strategy="best": the Trainer saves when this evaluation is a new best, with no event between the
        # decision and its save (which rotates older checkpoints away), so stage at every evaluation during
        # training; a staged state whose save never comes is dropped at the next commit.
        if args.save_strategy == "best" and self._in_training:
            self._stage(args, state)

    def on_save(self, args, state, control, **kwargs):
        if self._staged_step != state.global_step:  # a save nobody announced (a manual _save_checkpoint)
            self._stage(args, state)
        if state.is_world_process_zero:
            folder = checkpoint.checkpoint_folder(args.output_dir, state.global_step)
            if not checkpoint.commit(folder, record_files=self.verify_trainer_files):
                warnings.warn(f"checkpoint folder {folder} not found; dataflex state not saved", stacklevel=2)
        dist.barrier()  # no rank may run ahead (and possibly crash and resume) before the state is in place

    def _stage(self, args: Any, state: Any) -> None:
        """Write this step's state where a crash cannot lose it, before the Trainer's own checkpoint."""
        payload = self.state_dict(global_step=state.global_step)  # collective: every rank calls it
        self._gather_embeddings()
        tensors = self.decider.tensor_state_dict()
        if state.is_world_process_zero:
            folder = checkpoint.checkpoint_folder(args.output_dir, state.global_step)
            checkpoint.stage(folder, payload, tensors, self.embeddings)
        self._staged_step = state.global_step
        dist.barrier()

    def on_train_end(self, args, state, control, **kwargs):
        self._in_training = False
        self._gather_embeddings()  # the cache the user reads after training holds every rank's examples
        if state.is_world_process_zero:
            checkpoint.drop_orphans(args.output_dir)
        self._detach_hooks()
        trainer = self._find_trainer()
        if getattr(trainer, "label_smoother", None) is not None:
            trainer.label_smoother = self.capture.unwrap_label_smoother(trainer.label_smoother)

    def _check_resumable(self, folder: str, global_step: int, model: torch.nn.Module) -> None:
        """Refuse (or, when allowed, warn about) a resume from a checkpoint without dataflex state."""
        if os.path.isdir(folder):
            checkpoint.repair_resumed_weights(model, folder)
        if checkpoint.has_state(folder):
            self._check_trainer_files(folder)
            checkpoint.check_resumes_the_run(folder)
            return
        message = (
            f"resuming at step {global_step} but {folder} has no dataflex state "
            f"({checkpoint.STATE_DIRNAME}/{checkpoint.STATE_FILENAME}): "
            "this checkpoint has no dataflex state, so the example order and decisions of the interrupted run "
            "cannot be reproduced"
        )
        if not self.allow_missing_state:
            raise FileNotFoundError(message + " (pass allow_missing_state=True to start afresh)")
        warnings.warn(message + "; starting afresh", stacklevel=3)

    def _check_trainer_files(self, folder: str) -> None:
        """Stop before the first step when the Trainer's files of ``folder`` changed since they were saved (the
        Trainer has loaded them by now). Rank 0 reads them; every rank raises (collective)."""
        if not self.verify_trainer_files:
            return
        problem = None
        if dist.rank() == 0:
            try:
                checkpoint.verify_checkpoint_files(folder)
            except ValueError as error:
                problem = str(error)
        problem = dist.all_gather_objects(problem)[0]
        if problem is not None:
            raise ValueError(problem)

    def _restore(self, folder: str, global_step: int) -> None:
        payload, tensors = checkpoint.restore(folder, self.embeddings)
        where = os.path.join(checkpoint.state_folder(folder) or folder, checkpoint.STATE_FILENAME)
        try:
            self.load_state_dict(payload, global_step=global_step)
            self.decider.load_tensor_state_dict(tensors)
        except KeyError as missing:  # an incomplete state: name the file and the field, not a bare KeyError
            raise ValueError(
                f"{where} is incomplete: it has no field {missing}; it was not written by dataflex or was edited"
            ) from None
        except (TypeError, ValueError) as error:
            raise ValueError(f"{where} cannot be resumed: {error}") from error

    def state_dict(self, global_step: int) -> dict[str, Any]:
        return wrap_state(
            self.sampler.fingerprint,
            {
                "global_step": int(global_step),
                "batching": self._batching,
                "sampler": self.sampler.state_dict(consumed=0),
                "decider": self.decider.state_dict(),
                "store": self.store.state_dict(),
                # Selected id lists equal the schedule's events: saved once, there, in binary form.
                "history": [
                    {k: v for k, v in h.items() if k != "ids"} | ({"ids": None} if "ids" in h else {})
                    for h in self.history
                ],
                "missing_labels": self.capture.missing_labels,
                "dynamics": None if self.dynamics is None else self.dynamics.state_dict(),
                "settings": self._settings,
            },
        )

    def _load_dynamics(self, saved: dict[str, Any] | None) -> None:
        if (saved is None) != (self.dynamics is None):
            has = "has no" if saved is None else "has a"
            wants = "keeps one" if self.dynamics is not None else "does not keep one"
            raise ValueError(
                f"the checkpoint {has} training-dynamics record but this run {wants} (dynamics=... or a detector "
                "selector): resume with the setting the run was started with"
            )
        if saved is not None:
            self.dynamics.load_state_dict(saved)

    def load_state_dict(self, state: dict[str, Any], global_step: int) -> None:
        payload = unwrap_state(state, self.sampler.fingerprint)
        if payload["global_step"] != global_step:
            raise ValueError(
                f"dataflex state is from step {payload['global_step']} but the Trainer resumes at step {global_step}"
            )
        saved = payload.get("batching", self._batching)  # older states did not record it
        if saved != self._batching:
            raise ValueError(
                f"the checkpoint was written with {_describe(saved)} but this run has {_describe(self._batching)}: "
                "the Trainer would map its steps to other samples, so the run would not continue where it stopped; "
                "resume with the same number of processes, per-device batch size and gradient accumulation"
            )
        # The Trainer skips consumed batches itself, so the sampler must not skip them again.
        self.sampler.load_state_dict(payload["sampler"], restore_position=False)
        self.decider.load_state_dict(payload["decider"])
        saved_settings = payload.get("settings", self._settings)  # states written before 2026-12 did not record them
        differences = describe_differences(saved_settings, self._settings)  # (NaN knobs compare equal)
        if differences:
            # The restored schedule and policy state would carry on under the new knobs, or override them: a
            # Static mixture resumed with other weights went on training on the saved ones and logging them.
            raise ValueError(
                f"the checkpoint's run was made with other dataflex settings ({differences}): resume with the "
                "settings it was saved with, or start a new run (another output_dir) from its weights to train with "
                "these"
            )
        self.store.load_state_dict(payload["store"])
        history = payload["history"]
        schedule = self.sampler.schedule
        starts = [schedule.segment(i)[0] for i in range(len(schedule))]
        if not isinstance(history, list) or [h.get("effective_at") for h in history] != starts:
            raise ValueError(
                f"the decision history ({len(history)} entries) does not match the sampler's schedule "
                f"({len(starts)} events at samples {starts[:6]}...): the state was truncated or edited"
            )
        for entry, start in zip(history, range(len(starts))):
            if "ids" in entry and entry["ids"] is None:  # saved without them: they are the schedule's event
                entry["ids"] = schedule.segment(start)[1].tolist()
        self.history = list(history)
        self.capture.missing_labels = int(payload["missing_labels"])
        self._load_dynamics(payload.get("dynamics"))
        self._checks_left = CHECKS_AFTER_START if self.check_ids else 0
