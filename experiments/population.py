"""Run many experiments of one shape as one population fit (gmm.population), each logged as its own MLflow run.

    results = run_population(configs, tracking_uri, "gmm", parent_run_ids=parent, run_names=[...], tags=[...])

The configs must agree on everything but the options a population may vary per member (`gmm.population.
PER_MEMBER`: learning rates, clamp, seed, reset, ...) and the data seed: one family, K, D, iterations,
evaluation step, dtype and device, full-batch autograd fits. Each member's run holds exactly what
`run_experiment` logs for that config (params, curves, events, summary, figures, model); the validation NLL and
smallest variances at every evaluation are computed for all members at once.

Per member, the outcome is its ExperimentResult or the exception that ended its run: a non-finite NLL
(gmm.NonFiniteNLLError, run FAILED), a non-finite validation NLL (FloatingPointError, FAILED), or what its
`on_eval` raised (StopRun: the status it carries). One member's end does not stop the others. An interrupt
(Ctrl-C, SIGTERM) or any other error ends every run (KILLED / FAILED), each with its partial record.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping, Sequence

import torch

import gmm
from gmm.population import PER_MEMBER

from .config import ExperimentConfig
from .datasets import load_dataset
from .run import ExperimentResult, default_run_name, finish_run, run_tags_of, start_logging
from .run_log import Evaluator, log_partial_record
from .tracking import resolve_tracking_uri, tracked_run

__all__ = ["population_options", "run_population"]


def population_options(configs: Sequence[ExperimentConfig]) -> dict:
    """The fit options of a population of `configs`: per-member lists for `PER_MEMBER`, one value otherwise.

    Raises:
        ValueError: the configs differ in an option a population shares, or cannot batch (mini-batches, ...).
    """
    per = [c.fit_options() for c in configs]
    options = {}
    for key in per[0]:
        values = [p[key] for p in per]
        if key in PER_MEMBER:
            options[key] = values
        elif any(v != values[0] for v in values):
            raise ValueError(f"a population shares {key}; the configs have {sorted(set(map(str, values)))}")
        else:
            options[key] = values[0]
    if options.get("gradients", "autograd") != "autograd" or options.get("compile"):
        raise ValueError("a population fits with autograd gradients and no compilation (gmm.population)")
    shape = {(c.family, c.model_components, c.model_dims, c.resolved_eval_every) for c in configs}
    if len(shape) > 1:
        raise ValueError(f"a population needs one family, K, D and eval_every; got {sorted(map(str, shape))}")
    return options


def run_population(
    configs: Sequence[ExperimentConfig],
    tracking_uri: str | None = None,
    experiment_name: str = "gmm",
    *,
    parent_run_ids: str | Sequence[str | None] | None = None,
    run_names: Sequence[str] | None = None,
    tags: Sequence[Mapping[str, str]] | None = None,
    on_eval: Callable[[int, int, float], None] | None = None,
) -> list[ExperimentResult | BaseException]:
    """Fit `configs` as one population and log one MLflow run per config (see the module docstring).

    Args:
        parent_run_ids: one parent for every run, or one per run.
        on_eval: called as on_eval(member, step, val_nll) at every evaluation; what it raises ends that member.

    Returns:
        Per config, its ExperimentResult or the exception that ended its run.

    Raises:
        TypeError / ValueError: bad configs (before any run exists); KeyboardInterrupt and errors outside the
        members' own (every run then ends with it).
    """
    configs = list(configs)
    if not configs or not all(isinstance(c, ExperimentConfig) for c in configs):
        raise TypeError("configs must be a non-empty sequence of ExperimentConfig")
    options = population_options(configs)
    uri = resolve_tracking_uri(tracking_uri)
    specs = [c.data_spec() for c in configs]
    loaded = {spec: load_dataset(spec) for spec in dict.fromkeys(specs)}  # once each: members share tensors, true NLLs
    datas = [loaded[spec] for spec in specs]
    count = len(configs)
    parents = list(parent_run_ids) if isinstance(parent_run_ids, (list, tuple)) else [parent_run_ids] * count
    names = list(run_names) if run_names is not None else [default_run_name(c, d) for c, d in zip(configs, datas)]  # noqa: B905
    extra = list(tags) if tags is not None else [{}] * count
    contexts = [
        tracked_run(uri, experiment_name, run_name=n, parent_run_id=p, tags=run_tags_of(c, d, t))
        for c, d, n, p, t in zip(configs, datas, names, parents, extra, strict=True)
    ]
    opened: list = []
    errors: list[BaseException | None] = [None] * count  # members that ended on their own, filled by _run
    try:
        for cm in contexts:
            opened.append(cm.__enter__())
        outcomes = _run(configs, datas, opened, options, on_eval, errors)
    except BaseException:
        info = sys.exc_info()
        for cm, own in zip(contexts[: len(opened)], errors, strict=False):  # the runs opened
            # a member that had already ended (pruned, failed) keeps its own status; the others get the interrupt
            cm.__exit__(*((type(own), own, own.__traceback__) if own is not None else info))
        raise
    for cm, outcome in zip(contexts, outcomes, strict=True):
        if isinstance(outcome, BaseException):
            cm.__exit__(type(outcome), outcome, outcome.__traceback__)
        else:
            cm.__exit__(None, None, None)
    return outcomes


def _stack(tensors: list[torch.Tensor], fingerprints: list[str]) -> torch.Tensor:
    """(N, D) when every member has the same data, else (B, N, D)."""
    if len(set(fingerprints)) == 1:
        return tensors[0]
    return torch.stack(tensors)


def _run(configs, datas, opened, options, on_eval, errors: list) -> list:
    first = configs[0]
    device, dtype = torch.device(first.device), first.torch_dtype
    count = len(configs)
    loggers = [start_logging(c, d, client, run_id) for c, d, (client, run_id) in zip(configs, datas, opened, strict=True)]
    fingerprints = [d.fingerprint for d in datas]
    train = _stack([d.train.to(device, dtype) for d in datas], fingerprints)
    val = _stack([d.val.to(device, dtype) for d in datas], fingerprints)
    has_val = val.shape[-2] > 0
    model = gmm.make_model(
        first.family, first.model_components, first.model_dims, dtype=dtype, device=device, batch_shape=(count,)
    )
    evaluators = [
        Evaluator(model, d.val.to(device, dtype), c, lg, None) for c, d, lg in zip(configs, datas, loggers, strict=True)
    ]

    def callback(step: int, nlls: list[float], new_events: list) -> list[int]:
        by_member: list[list] = [[] for _ in range(count)]
        for e in new_events:
            by_member[e.member].append(e)
        with torch.no_grad():
            val_nlls = model.nll(val).tolist() if has_val else [math.nan] * count
            smallest = model.family.variances_of(model.raw_cov.detach()).amin(-1).double().cpu()  # (B, K')
        stop = []
        for i, ev in enumerate(evaluators):
            if errors[i] is not None or not ev.counts(step, by_member[i]):
                continue
            if math.isnan(nlls[i]):  # stopped earlier in the fit (tol): nothing more to record
                continue
            try:  # record raises FloatingPointError on a non-finite validation NLL: that member's end alone
                ev.record(step, nlls[i], val_nlls[i], smallest[i])
                if on_eval is not None:
                    on_eval(i, step, val_nlls[i] if has_val else nlls[i])
            except Exception as err:  # noqa: BLE001  (the member's own end: its run gets this error)
                errors[i] = err
                stop.append(i)
        return stop

    for lg in loggers:
        lg.in_fit = True
    try:
        results = gmm.fit(model, train, **options, log_freq=first.resolved_eval_every, callback=callback)
    except BaseException:
        partial = model.fit_result_
        for i, lg in enumerate(loggers):
            log_partial_record(lg, partial.members[i] if partial is not None else None, configs[i])
        raise
    return _finish_members(configs, datas, loggers, evaluators, model, results, errors)


def _finish_members(configs, datas, loggers, evaluators, model, results, errors: list) -> list:
    """Each member's ExperimentResult (experiments.run.finish_run on its own model), or the error that ended it."""
    outcomes: list = []
    for i, (config, data, lg) in enumerate(zip(configs, datas, loggers, strict=True)):
        lg.in_fit = False
        error = errors[i] = errors[i] or results.errors[i]
        if error is not None:
            log_partial_record(lg, results[i], config)
            outcomes.append(error)
            continue
        member = model.member(i)
        train_i = data.train.to(model.device, model.dtype)
        val_i = data.val.to(model.device, model.dtype)
        evaluators[i].model = member
        try:  # one member's failure after the fit (EM, the store) ends its run alone
            outcomes.append(finish_run(config, data, lg, member, results[i], evaluators[i], train_i, val_i))
        except Exception as err:  # noqa: BLE001  (the member's outcome; Ctrl-C still ends every run)
            log_partial_record(lg, results[i], config)
            errors[i] = err
            outcomes.append(err)
    return outcomes
