"""``mlet results run|report|list``: every experiment store and report of docs/results, from one command.

    mlet results list                            # the sweeps, in the order `run` takes them
    mlet results run --dry-run                   # per sweep: its store, runs planned / done / to run
    mlet results run [NAME ...] [--jobs 2]       # missing data sets first, then the sweeps; resumes
    mlet results report                          # every report re-rendered from its store

The sweeps are :data:`mlet_torchrec.experiments.families.SWEEPS`; ``run`` skips, in one line each, the sweeps
whose raw data (../shared/data) is absent and runs the rest.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mlet_torchrec.cli import flags

OLDER_REPORTS = ("synth1m", "movielens", "criteo_sample")
"""The reports of docs/results/NAME rendered from docs/results/NAME/results.jsonl (``mlet report``)."""


def _names(args: argparse.Namespace) -> list[str] | None:
    return list(args.names) or None  # none given: every sweep


def _cmd_list(args: argparse.Namespace) -> int:
    from mlet_torchrec.experiments.families import sweeps

    for s in sweeps(_names(args)):
        print(f"{s.name}  dataset={s.dataset}  store={s.store}  grid: {s.grid}  tune: {s.tune}")
    return 0


def _dry_run(names: list[str] | None) -> None:
    """Per sweep: runs planned, already in its store, to run (as ``mlet sweep --dry-run`` counts them)."""
    from mlet_torchrec.experiments.families import sweeps
    from mlet_torchrec.experiments.grid import plan_cells
    from mlet_torchrec.experiments.store import ResultsStore

    for s in sweeps(names):
        st = s.settings()
        records = ResultsStore(st.results).load() if Path(st.results).exists() else []
        cells, pending = plan_cells(
            st.config,
            st.grid,
            st.tune,
            st.base_overrides,
            st.runs_dir or "",
            st.tune_mlet,
            st.tune_seeds,
            records,
            st.extend,
        )
        done_keys = {r["key"] for r in records if r.get("status") in ("ok", "diverged")}
        done = sum(c.key in done_keys for c in cells)
        waiting = f", {pending} waiting for their tuning runs" if pending else ""
        print(f"{s.name} -> {s.store}: {len(cells)} planned, {done} done, {len(cells) - done} to run{waiting}")


def _cmd_run(args: argparse.Namespace) -> int:
    from mlet_torchrec.experiments.families import prepare_data, run_families, sweeps

    if args.jobs < 1:
        raise flags.UsageError(f"--jobs must be >= 1, got {args.jobs}")
    names = _names(args)
    skipped = set(prepare_data(names, dry_run=args.dry_run))
    todo = [s.name for s in sweeps(names) if s.name not in skipped]
    if not todo:  # (an empty list would mean every sweep below)
        print("results: no sweep to run")
        return 0
    if args.dry_run:
        _dry_run(todo)
        return 0
    return run_families(todo, jobs=args.jobs)


def _cmd_report(args: argparse.Namespace) -> int:
    from mlet_torchrec.experiments.family_report import render_families
    from mlet_torchrec.experiments.report import render_report

    for path in render_families():
        print(f"wrote {path}")
    for name in OLDER_REPORTS:
        out = f"docs/results/{name}"
        print(f"wrote {render_report(f'{out}/results.jsonl', out)}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``results`` (with ``run``, ``report``, ``list``) to the ``mlet`` subcommands."""
    summary = "run every experiment sweep of docs/results (resumable) and re-render every report"
    p = flags.subparser(
        sub, "results", summary, "mlet results run --dry-run", "mlet results run --jobs 2", "mlet results report"
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="{run,report,list}")

    q = flags.subparser(
        actions,
        "run",
        "make the missing data sets, then run the sweeps in order; resumes where it stopped",
        "mlet results run --dry-run",
        "mlet results run dlrm_sgd_movielens --jobs 1",
    )
    q.add_argument("names", nargs="*", metavar="NAME", help="sweeps to run (default: all; see `mlet results list`)")
    q.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="cells trained at once, by worker processes every store shares (default 1; make results uses 2)",
    )
    q.add_argument("--dry-run", action="store_true", help="per sweep: runs planned, done and to run; train nothing")
    q.set_defaults(func=_cmd_run)

    q = flags.subparser(
        actions,
        "report",
        "re-render every report (the families' and docs/results/{synth1m,movielens,criteo_sample}) from its store",
        "mlet results report",
    )
    q.set_defaults(func=_cmd_report)

    q = flags.subparser(
        actions, "list", "one line per sweep: name, data set, store, grid, tuning grid", "mlet results list"
    )
    q.add_argument("names", nargs="*", metavar="NAME", help="sweeps to list (default: all)")
    q.set_defaults(func=_cmd_list)
