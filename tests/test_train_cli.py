"""allo-train's command line: user errors end with a one-line message and exit status 2."""

from allo.train.cli import main
from test_train import tiny  # noqa: F401 (fixture)


def test_bad_row_is_reported_with_file_line_and_field(tmp_path, capsys):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "1+1?", "chosen": "2"}\n')
    rc = main(["warmup", "--train_file", str(bad), "--eval_file", str(bad), "--output_dir", str(tmp_path / "out"),
               "--disable_tqdm"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{bad}:1: field 'rejected'" in err and "--skip_bad_rows" in err
    assert "Traceback" not in err


def test_stage_without_its_inputs_says_which_stage_to_run(tmp_path, capsys):
    rc = main(["improve", "--output_dir", str(tmp_path / "empty"), "--disable_tqdm"])
    err = capsys.readouterr().err
    assert rc == 2 and "run the `prepare` stage first" in err


def test_a_bad_model_path_is_refused_before_any_stage(tmp_path, capsys):
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text("{}")
    a_file = tmp_path / "model.bin"
    a_file.write_text("")
    cases = [(str(tmp_path / "missing"), "no such folder"), ("./missing_model", "no such folder"),
             (str(empty), "no config.json"), (str(no_tokenizer), "no tokenizer files"), (str(a_file), "is a file")]
    for path, says in cases:
        try:
            main(["--model_name_or_path", path, "--output_dir", str(tmp_path / "out"), "--disable_tqdm"])
        except SystemExit as e:
            assert e.code == 2, path
        else:
            raise AssertionError(f"{path} was accepted")
        err = capsys.readouterr().err
        assert f"--model_name_or_path {path}: " in err and says in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()  # refused before anything was written
    # a hub name is left to the hub (checked when loaded); so is the built-in model (no flag)
    from allo.train.config import model_source_problem

    assert model_source_problem("meta-llama/Llama-3.2-1B") is None and model_source_problem("gpt2") is None


def test_a_finished_run_leaves_its_process_group_after_a_barrier(tiny, tmp_path, monkeypatch):
    """Several processes: allo-train's last act is barrier + destroy_process_group, not the interpreter's
    exit (where one rank's teardown under the other's gloo traffic aborted it: exit code -6 after a
    finished run). One gloo process here, the calls spied."""
    import torch.distributed as dist

    calls = []
    for name in ("barrier", "destroy_process_group"):
        real = getattr(dist, name)
        monkeypatch.setattr(dist, name, lambda *a, _n=name, _f=real, **k: calls.append(_n) or _f(*a, **k))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        try:
            rc = main(["--model_name_or_path", str(tmp_path / "missing"), "--disable_tqdm"])  # refused up front
        except SystemExit as e:
            rc = e.code
        assert rc == 2 and dist.is_initialized() and calls == []
        assert main(["warmup", "--model_name_or_path", str(tiny / "sft"), "--train_file", str(tiny / "train.jsonl"),
                     "--max_steps", "1", "--report_to", "none", "--output_dir", str(tmp_path / "out"),
                     "--disable_tqdm"]) == 0
        assert calls == ["barrier", "destroy_process_group"] and not dist.is_initialized()
    finally:  # no group left behind for the next test, whatever failed
        if dist.is_initialized():
            dist.destroy_process_group()
