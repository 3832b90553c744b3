"""The seeds of a report: the config of every (family, seed), one seed's or one family's fits (tracked with
experiments.run / experiments.population) and their runs.csv rows, run serially or in a process pool."""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import multiprocessing
import os
import queue
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import gmm

from .config import ExperimentConfig
from .runs_table import seed_rows

_log = logging.getLogger(__name__)

EXPERIMENT = "reports"  # MLflow experiment of report (and verification) runs


class SeedFailed(RuntimeError):
    """A seed's fit failed (non-finite NLL, failed factorization, ...); the message names the seed."""


def check_plan(families: Sequence[str], num_seeds: int, jobs: int | None) -> list[str]:
    from gmm.validation import check_choice, check_int

    families = list(families)
    if not families:
        raise ValueError(f"give at least one family: one of {', '.join(gmm.FAMILIES)} (or 'all')")
    for family in families:
        check_choice(family, gmm.FAMILIES, "family")
    check_int(num_seeds, "seeds", minimum=1)
    if jobs is not None:  # None: default_jobs
        check_int(jobs, "jobs", minimum=1)
    return families


def seed_groups(num_families: int, num_seeds: int, population: bool) -> int:
    """How many groups run_seeds makes of these seeds: a population per family, else one per seed."""
    return num_families if population else num_families * num_seeds


def default_jobs(num_groups: int) -> int:
    """Worker processes when none are asked for: one per usable core, at most one per group (a family's
    population, or a seed with --one-by-one). A serial run fits with one torch thread, so a second core would
    otherwise sit idle; the numbers do not depend on the count (see experiments.report)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, num_groups))


# -- the plan ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SeedTask:
    """One seed of one family: what a (possibly spawned) worker needs. Picklable."""

    config: ExperimentConfig
    tracking_uri: str
    experiment: str
    parent_run_id: str | None
    report_name: str


def seed_configs(base: ExperimentConfig, families: Sequence[str], num_seeds: int) -> list[ExperimentConfig]:
    """The config of every (family, seed), families outer: seed i adds i to `seed` and (for generated data)
    to `data_seed`; EM is switched on."""
    configs = []
    for family in families:
        for i in range(num_seeds):
            changes: dict[str, Any] = {"family": family, "seed": base.seed + i, "em": True}
            if base.dataset is None:
                changes["data_seed"] = base.data_seed + i
            configs.append(base.replace(**changes))
    return configs


# -- one seed ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SeedOutcome:
    """What one seed measured: its runs.csv rows (GD, EM) and what the figures need. Picklable."""

    family: str
    seed: int
    data_seed: int
    rows: tuple[dict[str, Any], ...]
    gd_history: np.ndarray = field(repr=False)  # (T + 1,) float64
    em_history: np.ndarray = field(repr=False)
    reset_steps: tuple[int, ...]
    state_dict: dict[str, torch.Tensor] = field(repr=False)  # the GD model (CPU), for the median seed's figure
    variance: float
    fingerprint: str
    run_id: str


def _init_worker() -> None:
    """The initializer of a pool worker process (spawned for this pool alone, ended with it): the thread
    count it sets is that process's, never the caller's. The serial path uses `one_thread`, which restores it.
    It also makes a seed's imports (MLflow, matplotlib) here, so that a worker `started_workers` spawned makes
    them while the caller still sets up. Here, not in a first task: a Ctrl-C during an initializer ends the
    worker (the pool is then broken, nothing more runs), where a task would catch it and go on to the next."""
    torch.set_num_threads(1)  # one core per seed: the same numbers as a serial run, no oversubscription
    try:
        import gmm.plot  # noqa: F401

        from . import population  # noqa: F401
    except KeyboardInterrupt:  # Ctrl-C as it starts: it holds nothing yet; end without a traceback (the
        os._exit(130)  # command prints its one line), which also breaks the pool, so nothing more runs


def run_seed(task: SeedTask) -> SeedOutcome:
    """Run one seed with `run_experiment` (a nested MLflow run) and measure EM's fit quality too.

    Raises:
        SeedFailed: the fit failed (the MLflow run is marked FAILED).
    """
    from .run import run_experiment  # imports MLflow; kept out of `import experiments.report`

    cfg = task.config
    try:
        result = run_experiment(
            cfg, task.tracking_uri, task.experiment, parent_run_id=task.parent_run_id, run_name=_run_name(cfg),
            tags=_seed_tags(task),
        )  # fmt: skip
    except _FIT_ERRORS as err:
        raise _failed(cfg, err) from None
    return _outcome(cfg, result)


_FIT_ERRORS = (FloatingPointError, torch.linalg.LinAlgError, gmm.NonFiniteNLLError)


def _run_name(cfg: ExperimentConfig) -> str:
    return f"{cfg.family} seed {cfg.seed}"


def _seed_tags(task: SeedTask) -> dict[str, str]:
    cfg = task.config
    return {"report.name": task.report_name, "report.seed": str(cfg.seed), "report.family": cfg.family}


def _failed(cfg: ExperimentConfig, err: BaseException) -> SeedFailed:
    return SeedFailed(f"{cfg.family} seed {cfg.seed} (data_seed {cfg.data_seed}): {' '.join(str(err).split())}")


def run_family(tasks: Sequence[SeedTask]) -> list[SeedOutcome]:
    """Every seed of one family as one population (experiments.population: one batched fit, one MLflow run per
    seed, the numbers `run_seed` would give up to float rounding, and the same whatever else runs with them);
    seed by seed with `run_seed` when the config cannot batch (analytic or compiled steps).

    Raises:
        SeedFailed: a seed's fit failed (its run is marked FAILED; the other seeds' runs are finished).
    """
    from .population import population_options, run_population

    configs = [t.config for t in tasks]
    try:
        population_options(configs)
    except ValueError:
        return [run_seed(t) for t in tasks]
    first = tasks[0]
    try:
        results = run_population(
            configs, first.tracking_uri, first.experiment, parent_run_ids=first.parent_run_id,
            run_names=[_run_name(c) for c in configs], tags=[_seed_tags(t) for t in tasks],
        )  # fmt: skip
    except _FIT_ERRORS as err:  # a failure of the population itself (e.g. a factorization in a start)
        raise _failed(configs[0], err) from None
    for cfg, result in zip(configs, results, strict=True):
        if isinstance(result, BaseException):
            raise _failed(cfg, result) from None
    return [_outcome(cfg, result) for cfg, result in zip(configs, results, strict=True)]


def _outcome(cfg: ExperimentConfig, result) -> SeedOutcome:
    """A seed's runs.csv rows and figure inputs from its ExperimentResult."""
    key = {"family": cfg.family, "seed": cfg.seed, "data_seed": cfg.data_seed}
    rows = seed_rows(key, result.metrics)
    em = result.em
    return SeedOutcome(
        family=cfg.family,
        seed=cfg.seed,
        data_seed=cfg.data_seed,
        rows=rows,
        gd_history=result.fit.nll_history.double().cpu().numpy(),
        em_history=em.nll_history.double().cpu().numpy(),
        reset_steps=tuple(e.step for e in result.fit.events if e.kind == "reset"),
        state_dict={k: v.detach().cpu().clone() for k, v in result.model.state_dict().items()},
        variance=float(result.model.variance),
        fingerprint=result.fingerprint,
        run_id=result.run_id,
    )


# -- many seeds -------------------------------------------------------------------------------------------
@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One torch thread inside the block (the numbers of a pool worker), the caller's count restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_one_by_one(tasks: Sequence[SeedTask]) -> list[SeedOutcome]:
    """The seeds one after the other, each its own fit (`--one-by-one`: the reports of before populations)."""
    return [run_seed(t) for t in tasks]


def run_seeds(
    tasks: Sequence[SeedTask],
    jobs: int = 1,
    desc: str = "seeds",
    population: bool = True,
    on_group: Callable[[list[SeedOutcome]], None] | None = None,
    pool: ProcessPoolExecutor | None = None,
) -> list[SeedOutcome]:
    """Run every task, serially (jobs == 1) or in `jobs` processes, this one and spawned workers; results in
    task order.

    A tqdm bar counts finished seeds when stderr is a terminal. On the first failure the pending seeds
    are cancelled and the error is re-raised. `on_group` is called in this process with each group's outcomes
    as it ends (a family's seeds with `population`, else one seed), while the other groups still run. `pool`:
    the workers `started_workers` spawned ahead for these jobs (else they are spawned here).
    """
    from tqdm.auto import tqdm

    outcomes: list[SeedOutcome | None] = [None] * len(tasks)
    bar = tqdm(total=len(tasks), desc=desc, unit="seed", disable=not sys.stderr.isatty(), dynamic_ncols=True)
    groups: dict[str, list[int]] = {}  # a family's seeds: one population (or one seed at a time)
    for i, task in enumerate(tasks):
        groups.setdefault(task.config.family if population else str(i), []).append(i)
    run_group = run_family if population else run_one_by_one

    def done(indices: list[int], results: list[SeedOutcome]) -> None:
        for i, outcome in zip(indices, results, strict=True):
            outcomes[i] = outcome
        bar.update(len(indices))
        if on_group is not None:
            on_group(results)

    try:
        workers = _workers(jobs, len(groups))
        if workers == 0:
            with one_thread():
                for indices in groups.values():
                    done(indices, run_group([tasks[i] for i in indices]))
        else:
            _share(list(groups.values()), workers, run_group, lambda g: [tasks[i] for i in g], done, pool)
    finally:
        bar.close()
    return [o for o in outcomes if o is not None]


def _workers(jobs: int, num_groups: int) -> int:
    """The processes run_seeds spawns for `jobs` over `num_groups` groups: this process is one of the jobs."""
    return 0 if jobs <= 1 or num_groups <= 1 else min(jobs, num_groups) - 1


def _new_pool(workers: int) -> ProcessPoolExecutor:
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch/MLflow/sqlite state
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker)


def _ready() -> None:
    """A no-op task: submitting it spawns a worker now (a pool spawns its processes as tasks come)."""


@contextlib.contextmanager
def started_workers(jobs: int, num_groups: int) -> Iterator[ProcessPoolExecutor | None]:
    """The worker processes that run_seeds(jobs=`jobs`) needs for `num_groups` groups, spawned now: their
    start (an interpreter and its imports, about 3 s of CPU each) overlaps what the caller does before
    run_seeds (a report opens the store and its parent run). Pass the pool to run_seeds; None when it runs
    serially. Shut down when the block ends, however it ends."""
    workers = _workers(jobs, num_groups)
    if workers == 0:
        yield None
        return
    pool = _new_pool(workers)
    try:
        for _ in range(workers):  # one submit spawns one process while none is idle; _init_worker imports
            pool.submit(_ready)
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _share(
    groups: list[list[int]],
    workers: int,
    run_group: Callable,
    tasks_of: Callable,
    done: Callable,
    pool: ProcessPoolExecutor | None = None,
) -> None:
    """Run `run_group(tasks_of(group))` for each of `groups`, in this process and `workers` spawned ones
    (`run_group` a module-level function, its tasks picklable; `pool`: those workers, started ahead), each
    taking the next group when it is free; `done(group, outcomes)` in this process (between its own groups,
    then as the others end). This process being one of the jobs saves a worker's start (its imports, about
    3 s of CPU, and its store connection). A failure is re-raised here once it is seen; the groups not started
    are then dropped, and the running ones waited for. After the last group the workers are told to exit, not
    waited for: their exit overlaps what the caller does next."""
    todo, lock = collections.deque(groups), threading.Lock()
    ended: queue.SimpleQueue = queue.SimpleQueue()  # (group, future) of the workers, in the order they end
    stopping = threading.Event()

    def take() -> list[int] | None:
        with lock:
            return None if stopping.is_set() or not todo else todo.popleft()

    def feed() -> None:  # hand a free worker the next group (called again from each future's end, in the pool's thread)
        group = take()
        if group is None:
            return
        try:
            future = pool.submit(run_group, tasks_of(group))
        except BaseException as err:  # never drop a taken group: the main thread raises this
            stopping.set()
            future = concurrent.futures.Future()
            future.set_exception(err)
            ended.put((group, future))
            return
        future.add_done_callback(lambda f, g=group: on_end(g, f))

    def on_end(group: list[int], future) -> None:  # in the pool's thread
        if future.cancelled() or future.exception() is not None:
            stopping.set()  # a failure or an interrupt (Ctrl-C reaches the workers too): hand out no more groups
            _log.info("a worker's group %s failed or was interrupted: no more groups are handed out", group)
        ended.put((group, future))
        feed()

    pool = pool if pool is not None else _new_pool(workers)
    seen = 0
    try:
        for _ in range(workers):
            feed()
        with one_thread():
            while (group := take()) is not None:
                done(group, run_group(tasks_of(group)))
                seen += 1
                while not ended.empty():
                    finished, future = ended.get()
                    done(finished, future.result())
                    seen += 1
        while seen < len(groups):
            finished, future = ended.get()
            done(finished, future.result())
            seen += 1
    finally:
        stopping.set()
        pool.shutdown(wait=seen < len(groups), cancel_futures=True)
