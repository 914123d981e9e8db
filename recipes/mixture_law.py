"""Recipe: swarm -> fit -> propose -> main run, in one command (closing the mixing loop from a sweep).

    python -m dataflex.recipes.mixture_law                                  # every stage, then the table
    python -m dataflex.recipes.mixture_law stage=swarm swarm.run_index=3    # one swarm member (parallel jobs)
    python -m dataflex.recipes.mixture_law -m stage=swarm 'swarm.run_index=range(0,16)'   # a Hydra multirun

1. *Swarm* (:class:`dataflex.swarm.Swarm`): ``swarm.size`` small runs of the plain loop on textmix, each on a
   ``Static`` mixture drawn around the prior (Dirichlet, ``swarm.concentration``), each writing its
   per-domain validation loss and tokens per domain. Finished runs are skipped when the command is rerun.
2. *Fit* (:class:`dataflex.mixture_law.MixtureLaw`): every kind in ``law.kinds`` is scored by its error on
   held-out swarm runs (``law.folds``-fold); the kind with the lowest error is fitted on all runs and saved
   with them (``law.json``).
3. *Propose* (:func:`dataflex.mixture_search.propose_mixture`): the mixture minimising ``propose.objective``
   under the floor, the KL/L1 distance to the prior and, with ``propose.max_epochs``, the repetition caps of
   the main run's token budget (``proposal.json``); with ``propose.pessimism`` > 0 every prediction compared
   carries that many of the law's spreads (a proposal where the swarm's runs give no evidence ranks behind
   one they support); with ``propose.average_top`` > 1 the proposal is the mean of that many best candidates
   (top-k averaging); the schedule's earlier stages are searched on the plain laws.
4. *Main run*: the proposal, corrected online by :class:`~dataflex.policies.LawCorrected` inside an L1 trust
   region of ``correct.radius`` (0: the proposal as a ``Static`` mixture; with a radius the uncorrected
   proposal runs too, as ``law_static``), and the ``main.baselines`` (uniform, natural, odm, doremi) at the
   same budget and seed; the per-domain validation and test loss table is printed and
   written (``results.json``, ``results.md``) with ``predicted_vs_measured.png``.

Every stage caches its output under ``work_dir``, keyed by the settings it depends on: rerunning the command
continues where it stopped, and rerunning it with other settings recomputes what they change (the swarm's
folder, ``swarm-<key>``, is named by the settings its runs depend on; a larger ``swarm.size`` adds runs to it).
With ``swarm.stages`` > 1 each swarm run is also evaluated at fractions ``1/stages, 2/stages, ...``; laws
fitted there give a piecewise schedule ending at the proposal (:func:`~dataflex.mixture_search.propose_schedule`),
run as the ``law_schedule`` arm (:class:`~dataflex.policies.Piecewise`).
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from dataflex.domains import encode_domains
from dataflex.mixture_law import MixtureLaw
from dataflex.mixture_search import (
    Proposal,
    objective_values,
    propose_mixture,
    propose_schedule,
    ranking_skill,
    repetition_caps,
)
from dataflex.policies import ODM, LawCorrected, Natural, Piecewise, Static, Uniform
from dataflex.proxies.doremi import DoReMiOffline
from dataflex.recipes.mixture import load_split, run_experiment
from dataflex.state import read_json, write_json_atomic, write_text_atomic
from dataflex.swarm import Swarm

__all__ = ["BASELINES", "STAGES", "domain_tokens", "run_stages"]

STAGES = ("swarm", "fit", "propose", "main", "all")
BASELINES = ("uniform", "natural", "odm", "doremi")


def settings_key(**parts: Any) -> str:
    """A short stable digest of the settings a stage's output depends on (its cache key)."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def domain_tokens(train_ds: Any, names: list[str]) -> np.ndarray:
    """Tokens (bytes) of each domain's training split, in ``names`` order."""
    lengths = np.array([len(x) for x in train_ds["input_ids"]], dtype=np.float64)
    ids, found = encode_domains(train_ds["domain"])
    by_name = dict(zip(found, np.bincount(ids, weights=lengths, minlength=len(found))))
    return np.array([by_name[n] for n in names])


def run_stages(cfg: Any, make_model: Any, data_root: Path, work: Path) -> dict[str, Any] | None:
    """Run ``cfg.stage`` (and what it needs that is not cached yet); returns the main stage's results."""
    from dataflex.recipes.settings import check_mixture_law_settings

    check_mixture_law_settings(cfg, STAGES)  # callers other than the CLI get the same errors, before any data
    train_ds = load_split(data_root, "train", cfg.data.max_len, cfg.data.train_per_domain)
    _, names = encode_domains(train_ds["domain"])
    tokens = domain_tokens(train_ds, names)
    natural = tokens / tokens.sum()
    prior = natural if cfg.swarm.prior == "natural" else np.full(len(names), 1.0 / len(names))
    mean_len = tokens / np.bincount(encode_domains(train_ds["domain"])[0], minlength=len(names))
    validation_labels = load_split(data_root, "validation", cfg.data.max_len, None)["domain"]
    warn_of_unevaluated_domains(names, validation_labels)
    evaluated = encode_domains(validation_labels)[1]  # (a domain the objective names: refused now, not after the swarm)
    try:
        objective_values(np.zeros((1, len(evaluated))), evaluated, cfg.propose.objective)
    except ValueError as error:
        raise ValueError(f"propose.{error}") from None
    common = dict(
        make_model=make_model,
        data_root=data_root,
        max_len=cfg.data.max_len,
        val_per_domain=cfg.data.val_per_domain,
        train_ds=train_ds,
        progress=False,
    )
    per_fit = cfg.swarm.size - -(-cfg.swarm.size // cfg.law.folds)  # runs a held-out fit sees (the fewest)
    for kind in cfg.law.kinds:
        needed = MixtureLaw.runs_needed(kind, len(names))
        if per_fit < needed:
            raise ValueError(
                f"law kind {kind} needs {needed} runs per fit over {len(names)} domains; with swarm.size="
                f"{cfg.swarm.size} and law.folds={cfg.law.folds} a held-out fit sees {per_fit}: raise swarm.size "
                "or law.folds, or drop that kind from law.kinds"
            )
    # Everything a run's losses depend on besides its mixture (not swarm.size: a larger swarm reuses the runs
    # of a smaller one). The folder is named by it, so other settings make another swarm, never reuse this one.
    swarm_settings = {
        "steps": cfg.swarm.steps,
        "stages": cfg.swarm.stages,
        "batch_size": cfg.swarm.batch_size,
        "lr": cfg.lr,
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "data": OmegaConf.to_container(cfg.data, resolve=True),
    }
    proxy_val = cfg.swarm.get("val_per_domain")  # the validation examples per domain a proxy is scored on
    if proxy_val is not None:  # (only then in the key: swarms written before this setting existed stay valid)
        swarm_settings["val_per_domain"] = proxy_val
    swarm_key = settings_key(
        **swarm_settings, prior=prior.tolist(), concentration=cfg.swarm.concentration, seed=cfg.seed
    )
    swarm = Swarm(
        work / f"swarm-{swarm_key}",
        names,
        prior=prior,
        size=cfg.swarm.size,
        concentration=cfg.swarm.concentration,
        seed=cfg.seed,
        extra=swarm_settings,
    )

    staged = cfg.swarm.stages > 1  # evaluate along each run too: laws per fraction give a schedule

    def proxy(weights: np.ndarray, index: int, seed: int = cfg.seed, work_name: str = "work") -> dict[str, Any]:
        # One validation pass per stage, the last at the end of training gives the run's losses (no second
        # pass over the same examples afterwards); a proxy is scored on swarm.val_per_domain examples per
        # domain when set — at 100-step proxies, evaluation, not training, is most of a proxy's time.
        result = run_experiment(
            policy=Static(dict(zip(names, weights.tolist()))),  # by name: a list is refused for numeric names
            steps=cfg.swarm.steps,
            batch_size=cfg.swarm.batch_size,
            lr=cfg.lr,
            seed=seed,
            update_every=cfg.swarm.steps,
            eval_every=cfg.swarm.steps // cfg.swarm.stages,
            curve_per_domain=cfg.data.val_per_domain if proxy_val is None else proxy_val,
            curve_by_domain=True,
            work_dir=swarm.folder / f"{work_name}-{index}",
            eval_splits=(),
            **common,
        )
        final = result["curve"][-1]  # the loop always evaluates at its last step
        # Expected tokens per domain (the sampler draws each example's domain with these weights).
        expected = weights * cfg.swarm.steps * cfg.swarm.batch_size * mean_len
        along = [
            {"fraction": p["step"] / cfg.swarm.steps, "losses": p["by_domain"]}
            for p in result["curve"]
            if p["step"] < cfg.swarm.steps
        ]
        return {
            "losses": final["by_domain"],
            "tokens": dict(zip(names, expected.tolist())),
            "seconds": result["train_seconds"],
            **({"losses_at": along} if staged else {}),
        }

    indices = None if cfg.swarm.run_index is None else [int(cfg.swarm.run_index)]
    swarm.run(proxy, indices=indices)
    if cfg.stage == "swarm" or swarm.pending():
        if swarm.pending() and cfg.stage != "swarm":
            raise RuntimeError(f"swarm runs {swarm.pending()} are not finished; run stage=swarm for them first")
        return None
    runs = swarm.collect()
    noise = replicate_noise(cfg, swarm, runs, proxy) if cfg.swarm.get("replicates", 0) else None
    # Each stage's cache is keyed by the settings it depends on (and its upstream stage's key), so rerunning
    # with other settings computes anew instead of silently reusing a law, proposal or run made otherwise.
    law_key = settings_key(kinds=list(cfg.law.kinds), folds=cfg.law.folds, swarm=swarm_key, runs=len(runs))
    law_path, fit_path = work / f"law-{law_key}.json", work / f"fit-{law_key}.json"
    if not law_path.is_file():
        errors = {kind: MixtureLaw(kind, cfg.seed).held_out_error(runs, folds=cfg.law.folds) for kind in cfg.law.kinds}
        best = min(errors, key=lambda k: errors[k]["mean_mae"])
        MixtureLaw(best, cfg.seed).fit(runs).save(law_path)
        write_json_atomic(fit_path, {"chosen": best, "held_out": errors}, digest=True)
    law, fit = MixtureLaw.load(law_path), read_json(fit_path)
    errors = {k: round(v["mean_mae"], 4) for k, v in fit["held_out"].items()}
    skill = law_skill(fit, runs, cfg.propose.objective)
    print(
        f"law: {law.kind} (held-out mean absolute error per kind: {errors}; rank correlation of the held-out "
        f"runs' {cfg.propose.objective} loss with its prediction: { {k: round(v, 2) for k, v in skill.items()} })"
    )
    warn_if_unskilled(law.kind, skill[law.kind], cfg.propose.objective, len(runs))
    if cfg.stage == "fit":
        return None
    proposal_key = settings_key(
        law=law_key,
        propose=OmegaConf.to_container(cfg.propose, resolve=True),
        budget=[cfg.main.steps, cfg.main.batch_size],
    )
    proposal_path = work / f"proposal-{proposal_key}.json"
    if not proposal_path.is_file():
        caps = None
        if cfg.propose.max_epochs is not None:
            budget = cfg.main.steps * cfg.main.batch_size * float((natural * mean_len).sum())
            caps = repetition_caps(tokens, budget, cfg.propose.max_epochs)
        reference = prior if cfg.propose.no_worse_than == "prior" else None  # per-domain ceilings: no domain worse
        pessimism = float(cfg.propose.get("pessimism", 0.0))
        proposal = propose_mixture(
            law,
            cfg.propose.objective,
            no_worse_than=reference,
            pessimism=pessimism,
            average_top=cfg.propose.get("average_top", 1),
            **search_settings(cfg, prior, caps),
        )
        write_json_atomic(
            proposal_path,
            {
                "weights": proposal.as_mapping(),
                "predicted": dict(zip(proposal.eval_domains, proposal.predicted.tolist())),
                "objective": proposal.objective,
                "caps": None if caps is None else dict(zip(names, caps.tolist())),
                "spread": dict(zip(proposal.eval_domains, law.predict_spread(proposal.weights[None])[0].tolist()))
                if pessimism > 0
                else None,
            },
            digest=True,
        )
    proposed = read_json(proposal_path)
    print("proposal:", {k: round(v, 3) for k, v in proposed["weights"].items()})
    if staged:
        schedule_path = work / f"schedule-{proposal_key}.json"
        if not schedule_path.is_file():
            write_json_atomic(schedule_path, propose_stages(cfg, swarm, law, proposed, prior, names), digest=True)
        proposed = {**proposed, "schedule": read_json(schedule_path)}
        print("schedule:", [(s, {k: round(v, 3) for k, v in w.items()}) for s, w in proposed["schedule"]["stages"]])
    if cfg.stage == "propose":
        return None
    return main_runs(
        cfg,
        proposed,
        names,
        common,
        work,
        swarm_steps=cfg.swarm.steps * (len(runs) + (0 if noise is None else noise["runs"])),
        swarm_seconds=float(sum(read_json(swarm.result_path(i)).get("seconds", 0.0) for i in range(len(runs))))
        + (0.0 if noise is None else noise["seconds"]),
        noise=noise,
        skill=skill,
        fit=fit,
        runs=runs,
        key=proposal_key,
    )


def warn_of_unevaluated_domains(train_names: list[str], validation_labels: Any) -> None:
    """A training domain without validation examples has no loss for the law to predict: its proposed weight
    then follows only from how it moves the evaluated domains (and the worst-domain objective never sees it).
    That may be meant (a domain kept for transfer), so a warning before any run, not an error."""
    unevaluated = sorted(set(train_names) - set(encode_domains(validation_labels)[1]))
    if unevaluated:
        warnings.warn(
            f"training domains {unevaluated} have no validation examples: the law cannot predict their loss, "
            "so their proposed weights follow only from how they move the evaluated domains' losses (the 'worst' "
            "objective never sees them); add validation examples for them if their own loss matters",
            stacklevel=2,
        )


def replicate_noise(cfg: Any, swarm: Swarm, runs: Any, proxy: Any) -> dict[str, Any]:
    """Rerun the swarm's first ``swarm.replicates`` mixtures on another data order (same model init) and say
    how reproducible the proxies' order of mixtures is: Spearman's rank correlation between the two runs of
    each mixture, of the objective (``propose.objective``) and per evaluated domain, and the objective's
    spread between the replicas of one mixture against its spread across mixtures. A law can only learn an
    order the proxies reproduce; a correlation near 0 says the differences between mixtures are noise at
    this proxy size, whatever law is fitted. The replicas count in the swarm's cost."""
    count = int(cfg.swarm.replicates)
    seed = int(np.random.SeedSequence([int(cfg.seed), 0x5EED]).generate_state(1)[0] % 2**31)  # not the swarm's
    losses, seconds = [], 0.0
    for i in range(count):
        path = swarm.folder / f"replicate-{i:05d}.json"
        saved = read_json(path) if path.is_file() else None
        if saved is None or saved.get("seed") != seed:
            result = proxy(runs.weights[i], i, seed=seed, work_name="work-replicate")
            saved = {"seed": seed, "losses": result["losses"], "seconds": result["seconds"]}
            write_json_atomic(path, saved, digest=True)
        losses.append([saved["losses"][d] for d in runs.eval_domains])
        seconds += float(saved["seconds"])
    first, again = runs.losses[:count], np.asarray(losses)
    objective = cfg.propose.objective
    a, b = (objective_values(x, runs.eval_domains, objective) for x in (first, again))
    noise = {
        "runs": count,
        "seed": seed,
        "seconds": seconds,
        "objective_rank": ranking_skill(again, first, runs.eval_domains, objective),
        "domain_rank": dict(
            zip(
                runs.eval_domains,
                (ranking_skill(again[:, [j]], first[:, [j]], [d], d) for j, d in enumerate(runs.eval_domains)),
            )
        ),
        # sd of one run's objective from the pairs (var of a difference = 2 var), against the sd across mixtures
        "replicate_sd": float(np.sqrt(np.mean((a - b) ** 2) / 2)),
        "between_sd": float(np.std(objective_values(runs.losses, runs.eval_domains, objective), ddof=1)),
        "losses": again.tolist(),
    }
    per_domain = float(np.nanmedian(list(noise["domain_rank"].values())))
    print(
        f"replicates: {count} mixtures rerun on another data order; rank correlation of their {objective} loss "
        f"{noise['objective_rank']:+.2f}, per domain (median) {per_domain:+.2f}; sd of one run "
        f"{noise['replicate_sd']:.4f} vs across mixtures {noise['between_sd']:.4f}"
    )
    if not noise["objective_rank"] > 0:
        warnings.warn(
            f"the swarm's proxies do not reproduce their order of mixtures by {objective} loss on another data "
            f"order (rank correlation {noise['objective_rank']:+.2f} over {count} mixtures): no law fitted on "
            "them can rank mixtures by that objective. More or longer proxy runs (swarm.size, swarm.steps), or an "
            "objective they do reproduce, are what can change that.",
            stacklevel=2,
        )
    return noise


def law_skill(fit: dict[str, Any], runs: Any, objective: Any) -> dict[str, float]:
    """Each fitted kind's :func:`~dataflex.mixture_search.ranking_skill` on the swarm's held-out runs."""
    return {
        kind: ranking_skill(np.asarray(held["predicted"]), runs.losses, runs.eval_domains, objective)
        for kind, held in fit["held_out"].items()
    }


def warn_if_unskilled(kind: str, skill: float, objective: Any, num_runs: int) -> None:
    """A proposal from a law that cannot order held-out runs is a draw around the prior, whatever its predicted
    gain says: say so before the main runs are paid for, rather than report that gain as if it were meant."""
    if np.isnan(skill) or skill <= 0:
        warnings.warn(
            f"the {kind} law orders the swarm's held-out runs by their {objective} loss no better than chance "
            f"(Spearman rank correlation {skill:+.2f} over {num_runs} runs), so its proposal is not expected to "
            "beat the prior. More proxy runs (swarm.size) or a law with fewer parameters (law.kinds) may change "
            "that; swarm.replicates=k says whether the proxies themselves reproduce their order of mixtures.",
            stacklevel=2,
        )


def search_settings(cfg: Any, prior: np.ndarray, caps: np.ndarray | None) -> dict[str, Any]:
    """The constraints and seed shared by the mixture and the schedule search (``propose.*``)."""
    return dict(
        prior=prior,
        max_kl=cfg.propose.max_kl,
        max_l1=cfg.propose.max_l1,
        min_weight=cfg.propose.min_weight,
        max_weight=caps,
        seed=cfg.seed,
    )


def propose_stages(cfg: Any, swarm: Swarm, law: MixtureLaw, proposed: dict[str, Any], prior, names) -> dict[str, Any]:
    """The piecewise schedule (:func:`~dataflex.mixture_search.propose_schedule`) ending at the proposal,
    from laws of the chosen kind fitted on the swarm's losses at each fraction of its runs; stage starts in
    main-run steps. Each fraction's law reports its held-out error too."""
    laws, errors = {}, {}
    for f in swarm.fractions():
        runs_at = swarm.collect(f)
        laws[f] = MixtureLaw(law.kind, cfg.seed).fit(runs_at)
        errors[f] = MixtureLaw(law.kind, cfg.seed).held_out_error(runs_at, folds=cfg.law.folds)["mean_mae"]
    evaluated = law.runs.eval_domains
    final = Proposal(
        weights=np.array([proposed["weights"][d] for d in names]),
        predicted=np.array([proposed["predicted"][d] for d in evaluated]),
        objective=proposed["objective"],
        train_domains=list(names),
        eval_domains=list(evaluated),
    )
    caps = None if proposed["caps"] is None else np.array([proposed["caps"][d] for d in names])
    plan = propose_schedule(laws, final, cfg.propose.objective, **search_settings(cfg, prior, caps))
    return {
        "stages": [[round(f * cfg.main.steps), w] for f, w in plan.stages()],
        "fractions": plan.starts,
        "objective": plan.objective,
        "static_objective": plan.static_objective,
        "held_out_mae": {str(f): e for f, e in errors.items()},
    }


def main_runs(
    cfg,
    proposed,
    names,
    common,
    work: Path,
    *,
    swarm_steps: int,
    swarm_seconds: float,
    fit,
    runs,
    key: str,
    skill: dict[str, float],
    noise: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The proposal (corrected online) and the uniform and natural baselines at the main run's budget."""

    def corrected() -> LawCorrected:
        return LawCorrected(
            proposed["weights"],
            proposed["predicted"],
            radius=cfg.correct.radius,
            step=cfg.correct.step,
            max_weight=proposed["caps"],
        )

    def static() -> Static:
        return Static(proposed["weights"])

    def piecewise() -> Piecewise:
        return Piecewise([(int(s), w) for s, w in proposed["schedule"]["stages"]], cfg.main.update_every)

    arms: dict[str, Any] = {"law": corrected if cfg.correct.radius > 0 else static}
    if cfg.correct.radius > 0:
        arms["law_static"] = static  # the proposal without the online correction
    if "schedule" in proposed:
        arms["law_schedule"] = piecewise
    baselines = {"uniform": Uniform, "natural": Natural, "odm": ODM, "doremi": DoReMiOffline}
    for name in cfg.main.baselines:
        arms[name] = baselines[name]
    results: dict[str, Any] = {}
    main_settings = OmegaConf.to_container(cfg.main, resolve=True)
    main_settings.pop("baselines")
    for arm, make_policy in arms.items():
        upstream = {"proposal": key, "correct": OmegaConf.to_container(cfg.correct)} if arm.startswith("law") else {}
        if arm == "law_schedule":
            upstream["stages"] = cfg.swarm.stages
        arm_key = settings_key(
            arm=arm,
            main=main_settings,
            lr=cfg.lr,
            seed=cfg.seed,
            model=OmegaConf.to_container(cfg.model, resolve=True),
            data=OmegaConf.to_container(cfg.data, resolve=True),
            **upstream,
        )
        path = work / "main" / f"{arm}-{arm_key}.json"
        if not path.is_file():
            result = run_experiment(
                policy=make_policy(),
                steps=cfg.main.steps,
                batch_size=cfg.main.batch_size,
                lr=cfg.lr,
                seed=cfg.seed,
                update_every=cfg.main.update_every,
                # at the schedule's stage starts too, where it claims to be ahead of the static proposal
                eval_every=cfg.main.steps // cfg.swarm.stages if cfg.swarm.stages > 1 else 0,
                curve_per_domain=cfg.data.val_per_domain,
                work_dir=work / "main" / f"work-{arm}-{arm_key}",
                eval_splits=("validation", "test"),
                ckpt_dir=work / "main" / f"ckpt-{arm}-{arm_key}",
                ckpt_every=cfg.main.ckpt_every,
                **common,
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, result, digest=True)
        results[arm] = read_json(path)
    summary = {
        "objective": OmegaConf.to_container(cfg.propose, resolve=True)["objective"],  # (a name, or {domain: weight})
        "proposal": proposed,
        "law": fit["chosen"],
        "held_out_mae": {k: v["mean_mae"] for k, v in fit["held_out"].items()},
        "held_out_rank": skill,
        "replicates": noise,  # how reproducible the proxies' order of mixtures is (swarm.replicates; None: not run)
        "swarm_steps": swarm_steps,
        "swarm_steps_per_main_run": swarm_steps / cfg.main.steps,
        "swarm_seconds": swarm_seconds,  # this swarm's runs' training time (its folder's runs only)
        "main_seconds": {arm: r["train_seconds"] for arm, r in results.items()},
        "arms": {arm: {split: r[f"{split}_loss"] for split in ("validation", "test")} for arm, r in results.items()},
        # mean validation loss along each main run (at the schedule's stage starts)
        "along": {
            arm: {str(p["step"]): p["mean"] for p in r["curve"] if p["step"] < cfg.main.steps}
            for arm, r in results.items()
        },
    }
    write_json_atomic(work / "results.json", summary)
    table = report_lines(summary, names)
    write_text_atomic(work / "results.md", "\n".join(table) + "\n")
    print("\n".join(table))
    plot(work, runs, fit, proposed, results)
    return summary


def report_lines(summary: dict[str, Any], names: list[str]) -> list[str]:
    arms = summary["arms"]
    lines = [
        f"Law: {summary['law']} (held-out MAE {summary['held_out_mae']}; rank correlation of the held-out runs' "
        f"objective with its prediction {summary.get('held_out_rank')}); swarm cost {summary['swarm_steps']} proxy "
        f"steps = {summary['swarm_steps_per_main_run']:.2f} main runs.",
        "",
        "| domain | law predicted (proposal) | " + " | ".join(f"{a} test" for a in arms) + " |",
        "|---|---|" + "---|" * len(arms),
    ]
    predicted = summary["proposal"]["predicted"]
    for d in names:
        cells = " | ".join(f"{arms[a]['test'][d]:.3f}" for a in arms)
        lines.append(f"| {d} | {predicted.get(d, float('nan')):.3f} | {cells} |")
    for label, reduce in (("mean", np.mean), ("worst", np.max)):
        cells = " | ".join(f"{reduce(list(arms[a]['test'].values())):.3f}" for a in arms)
        lines.append(f"| **{label}** | {reduce(list(predicted.values())):.3f} | {cells} |")
    objective = summary.get("objective", "mean")
    if objective not in ("mean", "worst"):  # what the proposal was chosen for: one domain or weighted domains
        evaluated = list(predicted)

        def value(losses: dict[str, float]) -> str:
            return f"{objective_values(np.array([[losses[d] for d in evaluated]]), evaluated, objective)[0]:.3f}"

        label = objective if isinstance(objective, str) else ", ".join(f"{d} {w:g}" for d, w in objective.items())
        cells = " | ".join(value(arms[a]["test"]) for a in arms)
        lines.append(f"| **objective ({label})** | {value(predicted)} | {cells} |")
    schedule = summary["proposal"].get("schedule")
    if schedule:
        lines += ["", "Schedule (stage start step: weights):"]
        lines += [
            f"- {start}: " + ", ".join(f"{d} {w:.3f}" for d, w in weights.items())
            for start, weights in schedule["stages"]
        ]
        lines.append(
            "Law's objective at each stage end, schedule vs static proposal: "
            + ", ".join(f"{a:.4f} vs {b:.4f}" for a, b in zip(schedule["objective"], schedule["static_objective"]))
        )
    along = summary.get("along", {})
    if any(along.values()):
        lines += [
            "",
            "Mean validation loss along the main runs: "
            + "; ".join(
                f"{arm} " + ", ".join(f"step {k}: {v:.3f}" for k, v in points.items()) for arm, points in along.items()
            ),
        ]
    return lines


def plot(work: Path, runs, fit, proposed, results) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    held = np.asarray(fit["held_out"][fit["chosen"]]["predicted"])
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.scatter(runs.losses.ravel(), held.ravel(), s=10, alpha=0.6, label="swarm runs, held out")
    measured = results["law"]["validation_loss"]
    pairs = [(measured[d], p) for d, p in proposed["predicted"].items() if d in measured]
    ax.scatter(
        [m for m, _ in pairs], [p for _, p in pairs], s=30, marker="x", color="tab:red", label="main run (law arm)"
    )
    low = min(runs.losses.min(), min(m for m, _ in pairs))
    high = max(runs.losses.max(), max(m for m, _ in pairs))
    ax.plot([low, high], [low, high], color="gray", lw=0.8, ls=":")
    ax.set_xlabel("measured validation loss")
    ax.set_ylabel("law's prediction")
    ax.legend()
    fig.tight_layout()
    fig.savefig(work / "predicted_vs_measured.png", dpi=120)
    plt.close(fig)


def _hydra_main() -> None:
    import hydra
    from hydra.utils import instantiate, to_absolute_path
    from omegaconf import DictConfig

    from dataflex.recipes.settings import check_mixture_law_settings
    from dataflex.testbeds.tiny import default_data_dir

    @hydra.main(config_path="../configs", config_name="mixture_law", version_base=None)
    def main(cfg: DictConfig) -> None:
        check_mixture_law_settings(cfg, STAGES)
        model_cfg = cfg.model

        def make_model() -> torch.nn.Module:
            return instantiate(model_cfg, seed=cfg.seed)

        root = Path(to_absolute_path(cfg.data.path)) if cfg.data.path else default_data_dir() / "textmix"
        start = time.perf_counter()
        run_stages(cfg, make_model, root, Path(to_absolute_path(cfg.work_dir)) / f"seed{cfg.seed}")
        print(f"stage {cfg.stage} done in {time.perf_counter() - start:.0f} s")

    main()


if __name__ == "__main__":
    _hydra_main()
