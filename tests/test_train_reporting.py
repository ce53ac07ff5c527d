"""--report_to: metrics.jsonl always, plus TensorBoard / wandb / mlflow through accelerate's trackers.
wandb and mlflow are not installed here: stand-in modules record what accelerate's trackers call, so
these tests check what allo hands the trackers (runs, names, config, every logged row, finish)."""

import importlib.machinery
import json
import sys
import types

import pytest

from allo.train import TrainConfig, pipeline
from allo.train.reporting import MetricsSink, parse_report_to, report_problem, report_results
from test_train import _cfg, tiny  # noqa: F401 (fixture)


def _module(name, **attrs):
    m = types.ModuleType(name)
    m.__spec__ = importlib.machinery.ModuleSpec(name, None)  # importlib.util.find_spec finds it
    m.__dict__.update(attrs)
    return m


class FakeWandb:
    """wandb as accelerate's WandBTracker uses it: init -> run.log / run.finish, config.update."""

    def __init__(self):
        self.runs = []
        self.module = _module("wandb", init=self.init, config=types.SimpleNamespace(update=self.update_config))

    def init(self, **kwargs):
        run = types.SimpleNamespace(kwargs=kwargs, config={}, rows=[], finished=False)
        run.log = lambda values, step=None: run.rows.append((step, dict(values)))
        run.finish = lambda: setattr(run, "finished", True)
        self.runs.append(run)
        return run

    def update_config(self, values, allow_val_change=False):
        self.runs[-1].config.update(values)


class FakeMlflow:
    """mlflow as accelerate's MLflowTracker uses it."""

    def __init__(self):
        self.calls = []
        validation = _module("mlflow.utils.validation", MAX_PARAM_VAL_LENGTH=6000, MAX_PARAMS_TAGS_PER_BATCH=100)
        self.module = _module(
            "mlflow", utils=types.SimpleNamespace(validation=validation),
            search_experiments=lambda filter_string: [],
            create_experiment=lambda name, artifact_location=None, tags=None:
                self.calls.append(("experiment", name)) or "7",
            start_run=lambda **kw: self.calls.append(("start_run", kw["run_name"], kw["experiment_id"])),
            log_params=lambda params: self.calls.append(("params", dict(params))),
            log_metrics=lambda metrics, step=None: self.calls.append(("metrics", step, dict(metrics))),
            end_run=lambda: self.calls.append(("end_run",)))


def _installed_fake(monkeypatch, fake, env_var):
    """``fake``'s module importable under its name, and the tracker's own environment variable unset."""
    monkeypatch.setitem(sys.modules, fake.module.__name__, fake.module)
    monkeypatch.delenv(env_var, raising=False)
    return fake


@pytest.fixture
def wandb(monkeypatch):
    return _installed_fake(monkeypatch, FakeWandb(), "WANDB_PROJECT")


@pytest.fixture
def mlflow(monkeypatch):
    return _installed_fake(monkeypatch, FakeMlflow(), "MLFLOW_EXPERIMENT_NAME")


def test_report_to_is_checked_before_any_stage(monkeypatch):
    with pytest.raises(ValueError, match=r"--report_to 'wand': unknown 'wand'; expected all, none, or a comma-sep"):
        TrainConfig(report_to="wand").validate()
    with pytest.raises(ValueError, match=r"--report_to ' , ': empty"):
        TrainConfig(report_to=" , ").validate()
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(ValueError, match=r"--report_to wandb, mlflow needs `pip install wandb mlflow`"):
        TrainConfig(report_to="jsonl,wandb,mlflow").validate()
    # all: TensorBoard where installed, hosted trackers only when named
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    assert parse_report_to("all") == [] and parse_report_to("none") == [] and parse_report_to("jsonl") == []
    assert report_problem("all") is None
    assert "pip install tensorboard" in report_problem("tensorboard")


def test_trackers_get_the_config_every_row_and_are_finished(tmp_path, wandb, mlflow):
    stage_dir = tmp_path / "my_run" / "improve"
    stage_dir.mkdir(parents=True)
    config = {"beta": 0.1, "report_to": "all,wandb,mlflow", "model_name_or_path": None}
    sink = MetricsSink(str(stage_dir), "all,wandb,mlflow", enabled=True, config=config)
    rows = [{"step": 1, "loss": 0.69, "rewards/accuracies": 0.5, "note": "text"},
            {"step": 2, "loss": 0.61, "rewards/accuracies": 0.75, "note": "text"}]
    for row in rows:
        sink.log(row)
    sink.close()

    assert [json.loads(line) for line in open(stage_dir / "metrics.jsonl")] == rows
    numbers = [(r["step"], {k: v for k, v in r.items() if k not in ("step", "note")}) for r in rows]
    (run,) = wandb.runs
    assert run.kwargs == {"project": "allo", "name": "my_run-improve", "group": "my_run"}
    assert run.config == config and run.rows == numbers and run.finished
    MetricsSink(str(stage_dir), "wandb", enabled=True, config={**config, "run_name": "ablation-3"}).close()
    assert wandb.runs[-1].kwargs == {"project": "allo", "name": "ablation-3-improve", "group": "ablation-3"}
    assert mlflow.calls == [("experiment", "allo"), ("start_run", "my_run-improve", "7"), ("params", config),
                            *[("metrics", step, vals) for step, vals in numbers], ("end_run",)]
    assert list((stage_dir / "runs").glob("events.out.tfevents.*"))  # all: TensorBoard (installed with --dev)


def test_a_tracker_that_fails_to_start_leaves_none_running(tmp_path, wandb, mlflow):
    def refuse(**kwargs):
        raise RuntimeError("mlflow: tracking server unreachable")

    mlflow.module.start_run = refuse
    with pytest.raises(RuntimeError, match="unreachable"):
        MetricsSink(str(tmp_path), "mlflow,wandb", enabled=True)
    (run,) = wandb.runs
    assert run.finished  # started first (tensorboard, wandb, mlflow: a fixed order), then finished
    MetricsSink(str(tmp_path), "wandb", enabled=False).close()  # not the main process: nothing started
    assert len(wandb.runs) == 1


def test_each_trained_stage_and_the_eval_are_one_run_each(tiny, tmp_path, wandb, monkeypatch):  # noqa: F811
    monkeypatch.setenv("WANDB_PROJECT", "alignment")
    out = tmp_path / "run7"
    pipeline.run(_cfg(tiny, out, report_to="wandb", stages="warmup,select,forget,eval", eval_models="sft,forget",
                      max_steps=3, logging_steps=2).validate())
    stages = ("warmup", "forget", "eval")
    assert [r.kwargs for r in wandb.runs] == [{"project": "alignment", "name": f"run7-{s}", "group": "run7"}
                                             for s in stages]
    for run, stage in zip(wandb.runs, stages):
        logged = [json.loads(line) for line in open(out / stage / "metrics.jsonl")]
        assert [step for step, _ in run.rows] == [r["step"] for r in logged] == ([0] if stage == "eval" else [2, 3])
        assert run.config["report_to"] == "wandb" and run.config["forget_ratio"] == 0.03 and run.finished
        if stage != "eval":
            assert run.rows[0][1]["loss"] == logged[0]["loss"] and "learning_rate" in run.rows[0][1]
    evaluated = {m: json.load(open(out / "eval" / f"{m}.json")) for m in ("sft", "forget")}
    assert wandb.runs[-1].rows[0][1] == {f"{m}/{k}": v for m, res in evaluated.items() for k, v in res.items()}
    assert "forget/eval_rewards/accuracies" in wandb.runs[-1].rows[0][1]


def _lines(path):
    return [json.loads(line) for line in open(path)]


def test_a_stage_run_again_starts_its_metrics_afresh_and_only_the_main_process_writes(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.7}\n{"step": 2, "loss": 0.6}\n')
    other = MetricsSink(str(tmp_path), "jsonl", enabled=False)  # another process: nothing removed or written
    other.log({"step": 1, "loss": 9.0})
    other.close()
    assert [r["loss"] for r in _lines(path)] == [0.7, 0.6]
    sink = MetricsSink(str(tmp_path), "jsonl", enabled=True)  # not resumed: the old rows are no rows of this run
    sink.log({"step": 1, "loss": 0.5})
    sink.close()
    assert _lines(path) == [{"step": 1, "loss": 0.5}]
    sink = MetricsSink(str(tmp_path), "jsonl", enabled=True, resume_step=1)
    sink.log({"step": 2, "loss": 0.25})
    sink.close()
    assert _lines(path) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}]


def test_eval_results_are_one_row_keyed_by_model_and_metric(tmp_path):
    results = {"sft": {"eval_loss": 0.75, "eval_rewards/accuracies": 0.5, "note": "text"},
               "improve": {"eval_loss": 0.25, "eval_answer_accuracy": 1}}
    report_results(str(tmp_path), "jsonl", results)
    assert _lines(tmp_path / "metrics.jsonl") == [{"step": 0, "sft/eval_loss": 0.75, "sft/eval_rewards/accuracies": 0.5,
                                                   "improve/eval_loss": 0.25, "improve/eval_answer_accuracy": 1}]
