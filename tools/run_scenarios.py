"""Run a chosen set of named scenarios, each with a training time budget; evaluate each; table them all.

    python -m tools.run_scenarios --experiments='thesis_*' --max_train_minutes=10 \\
        --data_dir=../shared/data/ixi-t1-2mm --runs_dir=runs/thesis --output=runs/thesis/REPORT.md

For each scenario, in the order given: `python run.py --mode=config` (the run it asks for; a bad name or flag
stops the runner before anything trains), then `--mode=train` in RUNS_DIR/<experiment> with the budget, then
`--mode=evaluate` on the run's own validation subjects; at the end one `--mode=report` of every evaluated
scenario (the thesis's rows beside ours). Each job runs in its own process, as a user would type it: no job
imports another, a crash or an out-of-memory kill in one scenario leaves the others (the runner carries on and
exits 1 at the end), and each process hands its memory back before the next starts.

A scenario is skipped when it is finished: its folder holds the run asked for (the same settings), the last
record of its metrics marks it complete (it reached its planned end, or a time budget at least as long as the one
asked for now) and its evaluation is newer than that record. Otherwise it resumes from its last checkpoint (so a
longer budget trains a run on) and is evaluated again. Ctrl-C or SIGTERM is passed on to the running job (training
then stops with a final validation and checkpoint) and ends the runner; the same command later carries on.
Arguments after `--` are flags for every training job (e.g. `-- --model=small --loss=mse`).
"""

from __future__ import annotations

import argparse
import fnmatch
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from mrirecon_jax.config import Config, UserError
from mrirecon_jax.workdir import Workdir

RUN_PY = Path(__file__).resolve().parents[1] / "run.py"
OWN_FLAGS = ("--mode", "--experiment", "--workdir", "--max_train_minutes", "--data_dir")  # set by the runner
BUDGET_SLACK_S = 0.01  # wall_time_s is recorded to the millisecond


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiments", required=True,
                        help="comma-separated names or shell patterns of experiments/ files, e.g. 'thesis_*'")
    parser.add_argument("--max_train_minutes", type=float, required=True, help="training time budget of each run")
    parser.add_argument("--runs_dir", default="runs/scenarios", help="each scenario trains in RUNS_DIR/<name>")
    parser.add_argument("--data_dir", help="folder of NIfTI volumes (default: the demo source)")
    parser.add_argument("--output", help="the report to write (default: RUNS_DIR/REPORT.md)")
    parser.add_argument("--kinds", default="", help="evaluate: catalogue kinds to evaluate besides the run's own "
                        "policy, comma-separated, or 'all' (default: none, only the run's own policy)")
    parser.add_argument("--backend", choices=("cpu", "gpu", "tpu"), help="JAX backend of every job")
    parser.add_argument("train_flags", nargs="*", help="after --: flags for every training job")
    args = parser.parse_args(argv)
    if args.max_train_minutes <= 0:
        parser.error(f"--max_train_minutes must be positive, got {args.max_train_minutes}")
    for flag in args.train_flags:
        if not flag.startswith("--") or flag.split("=", 1)[0] in OWN_FLAGS:
            parser.error(f"{flag!r} after -- is not a training flag the runner leaves to you "
                         f"(it sets {', '.join(OWN_FLAGS)} itself)")
    return args


class Jobs:
    """Runs run.py jobs one at a time in their own process session, passing SIGINT/SIGTERM on to the running one."""

    def __init__(self, backend: Optional[str]):
        self.common = [f"--backend={backend}"] if backend else []
        self.stopped = False
        self._current: Optional[subprocess.Popen] = None

    def __enter__(self) -> "Jobs":
        self._previous = {sig: signal.signal(sig, self._forward) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _forward(self, signum, frame) -> None:
        self.stopped = True
        if self._current is not None and self._current.poll() is None:
            self._current.send_signal(signum)

    def command(self, *flags: str) -> list[str]:
        return [sys.executable, str(RUN_PY), *flags, *self.common]

    def call(self, *flags: str) -> int:
        """Run a job, its output passing through; its exit code."""
        args = self.command(*flags)
        print(f"run_scenarios: {shlex.join(args)}", flush=True)
        self._current = subprocess.Popen(args, start_new_session=True)  # signals reach it through _forward only
        try:
            return self._current.wait()
        finally:
            self._current = None

    def output(self, *flags: str) -> str:
        """Run a quick job and return its stdout; UserError with its error line if it fails."""
        result = subprocess.run(self.command(*flags), capture_output=True, text=True)
        if result.returncode != 0:
            lines = [line for line in result.stderr.splitlines() if line.startswith(("error: ", "FATAL"))]
            raise UserError((lines[-1] if lines else result.stderr.strip()[-2000:]).removeprefix("error: "))
        return result.stdout


def expand(patterns: str, jobs: Jobs) -> list[str]:
    """The experiments named by comma-separated names or patterns, in the order given, without repeats."""
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    if not wanted:
        raise UserError("--experiments names no experiment.")
    known = None
    names = []
    for pattern in wanted:
        if any(c in pattern for c in "*?["):
            known = known or [line.split()[0] for line in jobs.output("--mode=list").splitlines() if line.strip()]
            matched = fnmatch.filter(known, pattern)
            if not matched:
                raise UserError(f"--experiments={pattern!r} matches none of {', '.join(known)}.")
            names += matched
        else:
            names.append(pattern)  # checked by --mode=config
    return list(dict.fromkeys(names))


def trained_enough(work: Workdir, max_train_minutes: float) -> bool:
    """Whether the run's last metrics record marks it complete at its planned end, or at a time budget at least
    `max_train_minutes` long."""
    if not work.holds_run():
        return False
    try:
        records = work.read_metrics()
    except UserError:  # nothing recorded yet
        return False
    last = records[-1] if records else {}
    if not last.get("complete"):
        return False
    return (last.get("stopped_by") == "planned_end"
            or last["wall_time_s"] >= 60.0 * max_train_minutes - BUDGET_SLACK_S)


def run_scenario(name: str, cfg: Config, args: argparse.Namespace, jobs: Jobs) -> str:
    """Train and evaluate one scenario unless it is finished; returns what happened (raises UserError if not)."""
    work = Workdir(Path(args.runs_dir) / name)
    work.check_resumable(cfg)  # another run in its folder: neither skipped nor trained
    done = []
    if not trained_enough(work, args.max_train_minutes):
        code = jobs.call("--mode=train", f"--experiment={name}", f"--workdir={work}", *training_flags(args))
        if jobs.stopped:
            return "stopped while training"
        if code != 0:
            raise UserError(f"training exited with code {code}")
        if not trained_enough(work, args.max_train_minutes):
            raise UserError("training ended before its planned end or time budget")
        done.append("trained")
    if not work.evaluation_is_current():
        kinds = [] if args.kinds == "all" else [f"--kinds={args.kinds}"]
        code = jobs.call("--mode=evaluate", f"--workdir={work}", *kinds)
        if jobs.stopped:
            return "stopped while evaluating"
        if code != 0:
            raise UserError(f"evaluation exited with code {code}")
        done.append("evaluated")
    return " and ".join(done) if done else "skipped: already finished"


def training_flags(args: argparse.Namespace) -> list[str]:
    data = [f"--data_dir={args.data_dir}"] if args.data_dir else []
    return [f"--max_train_minutes={args.max_train_minutes:g}", *data, *args.train_flags]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    output = Path(args.output) if args.output else Path(args.runs_dir) / "REPORT.md"
    with Jobs(args.backend) as jobs:
        try:
            names = expand(args.experiments, jobs)
            planned = {}
            for name in names:  # every name and flag is checked before anything trains
                text = jobs.output("--mode=config", f"--experiment={name}", *training_flags(args))
                planned[name] = Config.from_json(text[text.index("{"):])
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        outcomes, finished = {}, []
        for name in names:
            try:
                outcomes[name] = run_scenario(name, planned[name], args, jobs)
            except UserError as err:
                outcomes[name] = f"failed: {err}"
            if jobs.stopped:
                break
            if not outcomes[name].startswith("failed"):
                finished.append(str(Path(args.runs_dir) / name))
        if finished and not jobs.stopped:
            if jobs.call("--mode=report", f"--workdirs={','.join(finished)}", f"--output={output}") != 0:
                outcomes["report"] = f"failed: the report of {len(finished)} scenarios was not written"
    for name, outcome in outcomes.items():
        print(f"run_scenarios: {name}: {outcome}")
    if jobs.stopped:
        print("run_scenarios: stopped by a signal; the same command carries on from there.", file=sys.stderr)
    elif finished and "report" not in outcomes:
        print(f"run_scenarios: report of {len(finished)} scenarios written to {output}")
    failed = jobs.stopped or not finished or any(o.startswith("failed") for o in outcomes.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
