"""run_pipeline.py's own behaviour: argument errors and config errors are one clean message."""
import pytest

import run_pipeline


def test_a_bad_config_is_one_message_and_exit_1(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("pipeline: {name: x}\nfoo: 1\n")
    assert run_pipeline.main(["--config", str(bad), "--definition", str(tmp_path / "out.json")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "foo: unknown key" in err and "Traceback" not in err
    assert not (tmp_path / "out.json").exists()


def test_a_missing_config_names_the_file(tmp_path, capsys):
    assert run_pipeline.main(["--config", str(tmp_path / "nope.yaml")]) == 1
    assert "nope.yaml: cannot read config" in capsys.readouterr().err


# Every flag that would be ignored in a combination is refused with what it goes with (exit 2).
REFUSED = [
    (["--local"], "--local goes with --execute or --prepare-data"),
    (["--invoke", "http://127.0.0.1:8080"], "--invoke needs a TARGET and at least one IMAGE"),
    (["--execute", "--runtime", "sagemaker"], "--runtime goes with --serve or --local --execute"),
    (["--definition", "d.json", "--runtime", "local"], "--runtime goes with --serve or --local --execute"),
    (["--serve", "m.tar.gz", "--runtime", "docker"], "invalid choice: 'docker'"),
    (["--wait"], "--wait goes with --execute on AWS"),
    (["--local", "--execute", "--wait"], "--wait goes with --execute on AWS"),
    (["--definition", "d.json", "--wait"], "--wait goes with --execute on AWS"),
    (["--local", "--execute", "--display-name", "x"], "--display-name goes with --execute on AWS"),
    (["--display-name", "x"], "--display-name goes with --execute on AWS"),
    (["--execute", "--keep-endpoint"], "--keep-endpoint goes with --local --execute"),
    (["--execute", "--run-dir", "r"], "--run-dir goes with --local --execute"),
    (["--local", "--prepare-data", "--run-dir", "r"], "--run-dir goes with --local --execute"),
    (["--yes"], "--yes goes with --cleanup"),
    (["--execute", "--yes"], "--yes goes with --cleanup"),
    (["--json"], "--json goes with --invoke"),
    (["--serve", "m.tar.gz", "--json"], "--json goes with --invoke"),
    (["--port", "9000"], "--port goes with --serve"),
    (["--local", "--execute", "--port", "9000"], "--port goes with --serve"),
    (["--host", "0.0.0.0"], "--host goes with --serve"),
    (["--serve", "m.tar.gz", "--runtime", "sagemaker", "--host", "127.0.0.1"],
     "--host goes with --serve (--runtime local"),
    (["--definition", "d.json", "--param", "A=1"], "--param goes with --execute"),
    (["--execute", "--data", "dogs/"], "--data goes with --prepare-data or --local --execute"),
    (["--definition-file", "d.json"], "--definition-file goes with --execute or --graph"),
    (["--definition-file", "d.json", "--definition", "o.json"], "--definition-file goes with --execute or --graph"),
    (["--serve", "m.tar.gz", "--config", "p.yaml"], "--config goes with commands that read the config"),
    (["--invoke", "u", "i.jpg", "--role", "arn"], "--role goes with commands that read the config"),
    (["--serve", "m.tar.gz", "--bucket", "b"], "--bucket goes with commands that read the config"),
    (["--serve", "m.tar.gz", "--region", "us-east-1"], "--region goes with commands that talk to AWS"),
    (["--serve", "m.tar.gz", "--execute"], "--serve and --execute do not go together"),
    (["--invoke", "u", "i.jpg", "--cleanup"], "--invoke and --cleanup do not go together"),
    (["--cleanup", "--prepare-data"], "--cleanup and --prepare-data do not go together"),
    (["--cleanup", "--definition", "d.json"], "--cleanup and --definition do not go together"),
]


@pytest.mark.parametrize("argv, message", REFUSED)
def test_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_pipeline.parse_args(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


# Every command README names parses as it is written there.
ACCEPTED = [
    ["--execute"],
    ["--execute", "--wait", "--param", "AccuracyThreshold=0.8", "--display-name", "ci-1"],
    ["--execute", "--wait", "--role", "arn:aws:iam::123456789012:role/r", "--bucket", "b", "--region", "us-east-1"],
    ["--execute", "--definition-file", "d.json"],
    ["--prepare-data", "--execute"],
    ["--local", "--execute", "--config", "pipeline.smoke.yaml"],
    ["--local", "--execute", "--param", "AccuracyThreshold=1.01", "--run-dir", "r", "--keep-endpoint"],
    ["--local", "--execute", "--definition-file", "d.json", "--data", "dogs/"],
    ["--local", "--execute", "--runtime", "sagemaker", "--definition", "d.json", "--graph", "g.png"],
    ["--local", "--prepare-data", "--data", "dogImages.zip"],
    ["--prepare-data"],
    ["--definition", "out.json", "--graph", "dag.png"],
    ["--graph", "dag.png", "--definition-file", "d.json"],
    [],
    ["--serve", "model.tar.gz", "--port", "8080", "--host", "127.0.0.1"],
    ["--serve", "model.tar.gz", "--runtime", "sagemaker", "--port", "0"],
    ["--invoke", "http://127.0.0.1:8080", "dog.jpg", "pup.png", "--json"],
    ["--invoke", "dogbreed-endpoint", "dog.jpg", "--region", "eu-west-1"],
    ["--cleanup"],
    ["--cleanup", "--yes", "--region", "us-east-1"],
]


@pytest.mark.parametrize("argv", ACCEPTED, ids=lambda argv: " ".join(argv) or "(nothing)")
def test_every_documented_command_parses(argv):
    args = run_pipeline.parse_args(argv)
    assert args.runtime in ("local", "sagemaker") and args.host == "127.0.0.1" and args.config


def test_readme_commands_are_in_the_accepted_table():
    """Each `python run_pipeline.py ...` line of README parses (placeholders filled in)."""
    import re
    import shlex
    from pathlib import Path
    readme = (Path(run_pipeline.__file__).parent / "README.md").read_text()
    lines = re.findall(r"python run_pipeline\.py([^\n`#|]*)", readme)
    assert len(lines) > 10
    for line in lines:
        argv = shlex.split(line.replace("...", "").replace("[", " ").replace("]", " "))
        run_pipeline.parse_args(argv)  # exit 2 (SystemExit) fails the test; argparse names the flag


def test_a_failed_execution_is_one_line_and_exit_1(capsys):
    from pipeline.errors import ExecutionFailed

    def failed():
        raise ExecutionFailed("execution abc Failed: FailStep: test accuracy 0.5 is below 1.01")
    assert run_pipeline.guarded(failed) == 1
    assert capsys.readouterr().err == "error: execution abc Failed: FailStep: test accuracy 0.5 is below 1.01\n"


def test_a_bug_keeps_its_traceback():
    def bug():
        raise KeyError("not ours")
    with pytest.raises(KeyError):
        run_pipeline.guarded(bug)
