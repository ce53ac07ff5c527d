"""Where a training stage's metrics go (``--report_to``): ``metrics.jsonl`` in the stage's folder,
always (the plots and the tests read it), plus the experiment trackers asked for, through
accelerate's tracker classes (:mod:`accelerate.tracking`), so each one behaves as it does in any
accelerate script.

``--report_to`` is ``all``, ``none``, or a comma-separated list of ``jsonl``, ``tensorboard``,
``wandb`` and ``mlflow``:

* ``all``: JSONL plus TensorBoard when it is installed. Hosted trackers are never started unasked
  (``wandb`` would ask for a login on a machine that has it installed): name them (``all,wandb``).
* ``tensorboard``: ``<stage folder>/runs``.
* ``wandb``: project ``$WANDB_PROJECT`` (default ``allo``), one run per stage named
  ``<run_name>-<stage>`` in the group ``<run_name>`` (``--run_name``, TRL's flag; default: the
  output_dir's folder name), with the run's options as its config. ``WANDB_MODE=offline`` and the
  other ``WANDB_*`` variables work as usual.
* ``mlflow``: experiment ``$MLFLOW_EXPERIMENT_NAME`` (default ``allo``), one run per stage named as
  for wandb, the options as its parameters; ``MLFLOW_TRACKING_URI`` says where.

The eval stage reports its table the same way: one row, ``<model>/<metric>`` at step 0
(:func:`report_results`), in a run of its own.

A named tracker that is not installed is an error before any stage runs (``report_problem``), not a
silent omission (accelerate itself skips an unavailable tracker with a debug message).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os

from .data import write_text

TRACKERS = ("tensorboard", "wandb", "mlflow")  # each one's package has its name
SINKS = ("jsonl",) + TRACKERS


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # ValueError: a module in sys.modules without a spec
        return False


def parse_report_to(value: str) -> list[str]:
    """The trackers ``value`` names (JSONL is implicit), or a ValueError naming the unknown ones (see
    :func:`trackers_to_start` for the check that they are installed)."""
    names = {v.strip() for v in str(value).split(",") if v.strip()}
    if names == {"none"}:
        return []
    if "all" in names:  # (with others: those too, e.g. all,wandb)
        names.discard("all")
        if _installed("tensorboard"):
            names.add("tensorboard")
        names.add("jsonl")
    bad = sorted(names - set(SINKS))
    if not names or bad:
        raise ValueError(f"--report_to {value!r}: {'unknown ' + ', '.join(map(repr, bad)) if bad else 'empty'}; "
                         f"expected all, none, or a comma-separated list of {', '.join(SINKS)}")
    return [t for t in TRACKERS if t in names]


def trackers_to_start(value: str) -> list[str]:
    """The trackers of ``--report_to value``, or a ValueError: a name that is unknown, or not installed."""
    trackers = parse_report_to(value)
    missing = [t for t in trackers if not _installed(t)]
    if missing:
        raise ValueError(f"--report_to {', '.join(missing)} needs `pip install {' '.join(missing)}` "
                         "(or leave it out: metrics.jsonl is always written)")
    return trackers


def report_problem(value: str) -> str | None:
    """Why ``--report_to value`` cannot run here, or None (checked before any stage runs)."""
    try:
        trackers_to_start(value)
    except ValueError as e:
        return str(e)
    return None


def _tracker(name: str, stage_dir: str, run: str | None):
    """An accelerate tracker for one stage (not started)."""
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    stage_dir = os.path.abspath(stage_dir)
    run = run or os.path.basename(os.path.dirname(stage_dir))
    run_name = f"{run}-{os.path.basename(stage_dir)}"
    if name == "tensorboard":
        return TensorBoardTracker("runs", stage_dir)
    if name == "wandb":
        return WandBTracker(os.environ.get("WANDB_PROJECT") or "allo", name=run_name, group=run)
    if name == "mlflow":  # (the tracker reads MLFLOW_EXPERIMENT_NAME itself, over this default)
        return MLflowTracker(experiment_name="allo", run_name=run_name)
    raise ValueError(name)


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line (infinity for a line cut short)."""
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return math.inf


class MetricsSink:
    """One stage's metrics: ``metrics.jsonl`` and the trackers of ``report_to``. ``enabled``: this
    process reports (the main one); ``config``: the run's options, stored with each tracker's run
    (its ``run_name``, if any, names the runs); ``resume_step``: the step a resumed stage continues
    from (later lines of metrics.jsonl are dropped: those steps run again)."""

    def __init__(self, stage_dir, report_to, *, enabled, resume_step=None, config: dict | None = None):
        self.path = os.path.join(stage_dir, "metrics.jsonl")
        self.enabled = enabled
        self.trackers = []
        if not enabled:
            return
        if resume_step is not None and os.path.exists(self.path):
            # a kill mid-write can leave a last line cut short: it is after the checkpoint too
            with open(self.path) as f:
                keep = "".join(line for line in f if _logged_step(line) <= resume_step)
            write_text(self.path, keep)
        elif os.path.exists(self.path):
            os.remove(self.path)
        names = trackers_to_start(report_to)  # (TrainConfig.validate checked it before any stage already)
        try:
            for name in names:
                tracker = _tracker(name, stage_dir, (config or {}).get("run_name"))
                tracker.start()
                self.trackers.append(tracker)
                if config:
                    tracker.store_init_configuration(config)
        except BaseException:
            self.close()
            raise

    def log(self, row: dict):
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        numbers = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        for tracker in self.trackers:
            tracker.log(numbers, step=row["step"])

    def close(self):
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.finish()


def report_results(stage_dir: str, report_to: str, results: dict, *, config: dict | None = None) -> None:
    """The eval stage's ``results`` (model -> metric -> value) as one row (step 0, keys
    ``<model>/<metric>``, e.g. ``improve/eval_rewards/accuracies``) of the stage's metrics.jsonl and of
    one run of each tracker (``<run_name>-eval``)."""
    row = {"step": 0}
    for model, metrics in results.items():
        row.update({f"{model}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
    sink = MetricsSink(stage_dir, report_to, enabled=True, config=config)
    try:
        sink.log(row)
    finally:
        sink.close()
