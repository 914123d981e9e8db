"""Checks on recipe settings, run before any data is read: every error names the config key and the value.

Hydra passes overrides through as given (``seed=abc`` arrives as the string ``"abc"``), and a bad value
would otherwise surface late and unnamed — a ``ZeroDivisionError`` for ``update_every=0``, a 19-frame
``IndexError`` for sequences longer than the model's positions, or a silent no-op for ``steps=-5``.
"""

from __future__ import annotations

import os
from typing import Any

from dataflex.checks import is_real, is_whole

__all__ = [
    "register_folder_resolver",
    "check_instruct_settings",
    "check_mixture_law_settings",
    "check_select_offline_settings",
    "check_vlm_settings",
    "fraction",
    "mixture_objective",
    "names",
    "one_of",
    "check_model_fits",
    "nonnegative_int",
    "optional_positive_int",
    "positive_int",
    "positive_number",
    "seed_value",
]


def seed_value(key: str, value: Any) -> int:
    """A seed: an integer in [0, 2**32) (numpy's SeedSequence and the Trainer's set_seed refuse others, naming
    neither the setting nor the value)."""
    if not is_whole(value) or not 0 <= value < 2**32:
        raise ValueError(f"{key} must be an integer in [0, 2**32); got {value!r}")
    return value


def positive_int(key: str, value: Any) -> int:
    if not is_whole(value) or value < 1:
        raise ValueError(f"{key} must be a positive integer; got {value!r}")
    return value


def nonnegative_int(key: str, value: Any) -> int:
    if not is_whole(value) or value < 0:
        raise ValueError(f"{key} must be an integer >= 0; got {value!r}")
    return value


def optional_positive_int(key: str, value: Any) -> int | None:
    return None if value is None else positive_int(key, value)


def positive_number(key: str, value: Any, *, allow_inf: bool = False) -> float:
    """A number > 0; infinite only with ``allow_inf`` (where inf means "no limit", e.g. a temperature for uniform
    weights): an infinite learning rate trains on NaNs."""
    if not is_real(value) or not value > 0 or value != value or (value == float("inf") and not allow_inf):
        raise ValueError(f"{key} must be a positive {'number' if allow_inf else 'finite number'}; got {value!r}")
    return float(value)


def check_model_fits(model: Any, *, max_len: int, vocab_needed: int, len_key: str = "data.max_len") -> None:
    """Refuse sequences longer than the model's positions, or token ids beyond its vocabulary, by name."""
    config = getattr(model, "config", None)
    positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if positions is not None and max_len > positions:
        raise ValueError(
            f"{len_key}={max_len} exceeds the model's {positions} positions; raise the model's n_positions "
            f"(model.n_positions=...) or lower {len_key}"
        )
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and vocab < vocab_needed:
        raise ValueError(f"the model's vocabulary has {vocab} tokens but the data uses ids up to {vocab_needed - 1}")


def fraction(key: str, value: Any, *, allow_zero: bool = False) -> float:
    """A share in (0, 1] (or [0, 1) with ``allow_zero``, for noise rates)."""
    ok = is_real(value)
    ok = ok and ((0 <= value < 1) if allow_zero else (0 < value <= 1))
    if not ok:
        raise ValueError(f"{key} must be a number in {'[0, 1)' if allow_zero else '(0, 1]'}; got {value!r}")
    return float(value)


def one_of(key: str, value: Any, valid: Any) -> Any:
    if value not in valid:
        raise ValueError(f"{key}={value!r}; valid values are {', '.join(map(str, valid))}")
    return value


def names(key: str, value: Any, valid: Any) -> list[str]:
    """A list of names from ``valid``, or one name written alone (``law.kinds=gp`` on a command line means
    ``[gp]``; iterating the string would check its letters)."""
    from collections.abc import Sequence

    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Sequence):
        raise ValueError(f"{key} must be a name or a list of names from {', '.join(map(str, valid))}; got {value!r}")
    return [one_of(key, name, valid) for name in value]


def mixture_objective(key: str, value: Any) -> str | dict[str, float]:
    """A mixture search's objective: ``mean``, ``worst``, one domain's name, or ``{domain: weight}`` (weights >= 0,
    not all 0; :func:`dataflex.mixture_search.objective_values` checks the domains once they are known)."""
    from collections.abc import Mapping

    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        weights = dict(value.items())
        if weights and all(is_real(w) and 0 <= w < float("inf") for w in weights.values()) and sum(weights.values()):
            return {str(domain): float(weight) for domain, weight in weights.items()}
    raise ValueError(
        f"{key} must be mean, worst, a domain name or {{domain: weight}} with weights >= 0, not all 0; got {value!r}"
    )


def check_vlm_settings(cfg: Any, methods: Any, resolve: Any = lambda p: p) -> None:
    """Every setting of ``configs/vlm.yaml``, checked before the digits data is built; ``resolve`` maps a
    path as given to where it is (Hydra changes the working directory)."""
    from dataflex.detectors import DETECTORS

    one_of("method", cfg.method, methods)
    if cfg.get("clean_with") is not None:
        one_of("clean_with", cfg.clean_with, DETECTORS)
        if cfg.method != "uniform":
            raise ValueError(
                f"clean_with reads the record of a plain run; it needs method=uniform, got method={cfg.method!r}"
            )
    if cfg.method == "subset":
        if cfg.get("subset_file") is None:
            raise ValueError("method=subset needs subset_file=<a subset file, e.g. a clean_with run's kept_ids.json>")
        _path("subset_file", resolve(cfg.subset_file), kind="file")
    elif cfg.get("subset_file") is not None:
        raise ValueError(f"subset_file is read by method=subset only; this run has method={cfg.method!r}")
    one_of("label_by", cfg.label_by, ("question", "question_answer"))
    fraction("noise", cfg.noise, allow_zero=True)
    fraction("fraction", cfg.fraction)
    for key in ("seed", "data_seed"):
        seed_value(key, cfg[key])
    for key in ("steps", "batch_size", "update_every", "save_steps", "holdout_steps", "clusters"):
        positive_int(key, cfg[key])
    nonnegative_int("warmup", cfg.warmup)
    optional_positive_int("num_images", cfg.num_images)
    positive_number("lr", cfg.lr)
    positive_number("temperature", cfg.temperature, allow_inf=True)  # inf: uniform weights
    for key in ("per_label", "class_conditional"):
        if not isinstance(cfg[key], bool):
            raise ValueError(f"{key} must be true or false; got {cfg[key]!r}")


def _path(key: str, value: Any, *, kind: str, required: bool = True) -> str | None:
    """A path setting that must name an existing file or folder (``kind``) when given."""
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key} must be a path to a {kind}; got {value!r}")
    exists = os.path.isdir(value) if kind == "folder" else os.path.isfile(value)
    if not exists:
        raise FileNotFoundError(f"{key}={value!r}: no such {kind}")
    return value


def check_select_offline_settings(cfg: Any, methods: Any, resolve: Any = lambda p: p) -> None:
    """Every setting of ``configs/select_offline.yaml``, checked before the model is built or data read;
    ``resolve`` maps a path as given to where it is (Hydra changes the working directory)."""
    one_of("method", cfg.method, methods)
    fraction("fraction", cfg.fraction)
    seed_value("seed", cfg.seed)
    for key in ("dim", "max_len", "batch_size"):
        positive_int(key, cfg[key])
    for key, kind, required in (
        ("checkpoint", "folder", False),
        ("target", "file", True),
        ("pool", "folder", False),
        ("base_weights", "file", False),
    ):
        _path(key, resolve(cfg[key]) if cfg[key] is not None else None, kind=kind, required=required)
    for key, optional in (("out", False), ("cache", True)):
        value = cfg[key]
        if not (optional and value is None) and not (isinstance(value, str) and value):
            raise ValueError(f"{key} must be a file path; got {value!r}")
    if cfg.checkpoint is None:  # the recipe warms up first: its settings are used
        warm = cfg.warmup
        fraction("warmup.fraction", warm.fraction)
        for key in ("epochs", "batch_size", "save_steps", "lora_r"):
            positive_int(f"warmup.{key}", warm[key])
        for key in ("lr", "lora_alpha"):
            positive_number(f"warmup.{key}", warm[key])
        modules = warm.target_modules
        if isinstance(modules, str) or not modules or not all(isinstance(m, str) and m for m in modules):
            raise ValueError(f"warmup.target_modules must be a non-empty list of module names; got {modules!r}")
        if not (isinstance(cfg.work_dir, str) and cfg.work_dir):
            raise ValueError(f"work_dir must be a folder path (the warm-up runs there); got {cfg.work_dir!r}")


def check_instruct_settings(cfg: Any, detectors: Any, resolve: Any = lambda p: p) -> None:
    """Every setting of ``configs/instruct.yaml`` and its ``detector`` group, checked before data is read."""
    detector = cfg.detector
    if not hasattr(detector, "get") or "name" not in detector:
        raise ValueError(f"detector must be a config group entry with a name; got {detector!r}")
    one_of("detector.name", detector.name, detectors)
    tasks = cfg.tasks
    if isinstance(tasks, str) or not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise ValueError(f"tasks must be a non-empty list of task names; got {tasks!r}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks must be distinct; got {list(tasks)}")
    fraction("noise", cfg.noise, allow_zero=True)
    for key in ("seed", "data_seed"):
        seed_value(key, cfg[key])
    for key in ("steps", "batch_size", "update_every", "save_steps"):
        positive_int(key, cfg[key])
    optional_positive_int("per_task", cfg.per_task)
    positive_number("lr", cfg.lr)
    if "drop" in detector:
        drop = detector.drop
        if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0 < drop < 1:
            raise ValueError(f"detector.drop must be a number in (0, 1); got {drop!r}")
    if "warmup" in detector:
        nonnegative_int("detector.warmup", detector.warmup)
    for key in ("folds", "fold_steps"):
        if key in detector:
            positive_int(f"detector.{key}", detector[key])
    if "folds" in detector and detector.folds < 2:
        raise ValueError(f"detector.folds must be >= 2 (each proxy scores the fold it left out); got {detector.folds}")
    if "analyzer" in detector:
        from dataflex.prompt_support import ANALYZERS

        one_of("detector.analyzer", detector.analyzer, tuple(ANALYZERS))
    if cfg.data_dir is not None:
        _path("data_dir", resolve(cfg.data_dir) if isinstance(cfg.data_dir, str) else cfg.data_dir, kind="folder")
    if cfg.base is not None:
        _path("base", resolve(cfg.base) if isinstance(cfg.base, str) else cfg.base, kind="file")


def check_mixture_law_settings(cfg: Any, stages: Any, baselines: Any = ("uniform", "natural", "odm", "doremi")) -> None:
    """Every setting of ``configs/mixture_law.yaml``, checked before any data is read."""
    from dataflex.mixture_law import LAW_KINDS

    one_of("stage", cfg.stage, stages)
    seed_value("seed", cfg.seed)
    positive_number("lr", cfg.lr)
    for key in ("size", "steps", "stages", "batch_size"):
        positive_int(f"swarm.{key}", cfg.swarm[key])
    if cfg.swarm.steps % cfg.swarm.stages:
        raise ValueError(
            f"swarm.steps={cfg.swarm.steps} must be a multiple of swarm.stages={cfg.swarm.stages} (the losses "
            "along each run are taken at equal fractions of it)"
        )
    positive_number("swarm.concentration", cfg.swarm.concentration)
    optional_positive_int("swarm.val_per_domain", cfg.swarm.get("val_per_domain"))
    one_of("swarm.prior", cfg.swarm.prior, ("uniform", "natural"))
    replicates = nonnegative_int("swarm.replicates", cfg.swarm.get("replicates", 0))
    if not (replicates == 0 or 3 <= replicates <= cfg.swarm.size):
        raise ValueError(
            f"swarm.replicates={replicates}: rerun 0 (none) or between 3 (an order needs three) and swarm.size="
            f"{cfg.swarm.size} of the swarm's mixtures"
        )
    if cfg.swarm.run_index is not None:
        index = nonnegative_int("swarm.run_index", cfg.swarm.run_index)
        if index >= cfg.swarm.size:
            raise ValueError(f"swarm.run_index={index} is outside the swarm's 0..{cfg.swarm.size - 1}")
    cfg.law.kinds = kinds = names("law.kinds", cfg.law.kinds, LAW_KINDS)  # (one name given alone: a list of it)
    if not kinds:
        raise ValueError("law.kinds must name at least one law kind")
    folds = positive_int("law.folds", cfg.law.folds)
    if not 2 <= folds <= cfg.swarm.size:
        raise ValueError(f"law.folds must be in [2, swarm.size={cfg.swarm.size}]; got {folds}")
    cfg.propose.objective = mixture_objective("propose.objective", cfg.propose.objective)
    if cfg.propose.no_worse_than not in (None, "prior"):
        raise ValueError(f"propose.no_worse_than must be null or prior; got {cfg.propose.no_worse_than!r}")
    if cfg.propose.no_worse_than is not None and "own_share" in kinds:
        from dataflex.mixture_search import OWN_SHARE_CEILING

        raise ValueError(
            f"propose.no_worse_than={cfg.propose.no_worse_than} with law.kinds={kinds}: {OWN_SHARE_CEILING}"
        )
    if cfg.propose.max_kl is not None and cfg.propose.max_l1 is not None:
        raise ValueError("give at most one of propose.max_kl and propose.max_l1")
    for key in ("max_kl", "max_l1", "max_epochs"):
        if cfg.propose[key] is not None:
            positive_number(f"propose.{key}", cfg.propose[key], allow_inf=True)  # inf: no constraint
    pessimism = cfg.propose.get("pessimism", 0.0)
    if isinstance(pessimism, bool) or not isinstance(pessimism, (int, float)) or not 0 <= pessimism < float("inf"):
        raise ValueError(f"propose.pessimism must be a number >= 0 (a multiple of the law's spread); got {pessimism!r}")
    positive_int("propose.average_top", cfg.propose.get("average_top", 1))
    weight = cfg.propose.min_weight
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < 1:
        raise ValueError(f"propose.min_weight must be a number in [0, 1); got {weight!r}")
    radius = cfg.correct.radius
    if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not 0 <= radius <= 2:
        raise ValueError(f"correct.radius must be a number in [0, 2]; got {radius!r}")
    positive_number("correct.step", cfg.correct.step)
    for key in ("steps", "batch_size", "update_every", "ckpt_every"):
        positive_int(f"main.{key}", cfg.main[key])
    starts = [cfg.main.steps * s / cfg.swarm.stages for s in range(1, cfg.swarm.stages)]
    off = [s for s in starts if s % cfg.main.update_every]
    if off:
        raise ValueError(
            f"with swarm.stages={cfg.swarm.stages} the schedule's stages start at main steps {starts}, and "
            f"{off} are not multiples of main.update_every={cfg.main.update_every} (weights change only at updates)"
        )
    cfg.main.baselines = names("main.baselines", cfg.main.baselines, baselines)
    positive_int("data.max_len", cfg.data.max_len)
    optional_positive_int("data.val_per_domain", cfg.data.val_per_domain)
    optional_positive_int("data.train_per_domain", cfg.data.train_per_domain)


def register_folder_resolver() -> None:
    """Make ``${dataflex_folder:${hydra:job.override_dirname}}`` available to the recipes' configs, which name each
    run's folder by its overrides: :func:`dataflex.run_folder.folder_name` keeps that name within what a file
    system takes. Call before ``hydra.main`` runs (it resolves the run folder first)."""
    from omegaconf import OmegaConf

    from dataflex.run_folder import folder_name

    OmegaConf.register_new_resolver("dataflex_folder", folder_name, replace=True)
