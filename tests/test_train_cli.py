"""allo-train's command line: user errors end with a one-line message and exit status 2."""

from allo.train.cli import main


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
