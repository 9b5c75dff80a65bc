"""run_pipeline.py's own behaviour: argument errors and config errors are one clean message."""
import pytest

import run_pipeline


def test_a_bad_config_is_one_message_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("pipeline: {name: x}\nfoo: 1\n")
    assert run_pipeline.main(["--config", str(bad), "--definition", str(tmp_path / "out.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "foo: unknown key" in err and "Traceback" not in err
    assert not (tmp_path / "out.json").exists()


def test_a_missing_config_names_the_file(tmp_path, capsys):
    assert run_pipeline.main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: cannot read config" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--local"], "--local goes with --execute or --prepare-data"),
    (["--invoke", "http://127.0.0.1:8080"], "--invoke needs a TARGET and at least one IMAGE"),
    (["--execute", "--runtime", "sagemaker"], "--runtime goes with --serve or --local --execute"),
    (["--serve", "m.tar.gz", "--runtime", "docker"], "invalid choice: 'docker'"),
])
def test_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_pipeline.parse_args(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
