#!/usr/bin/env python3
"""Build, run and serve the dog-breed pipeline.

  python run_pipeline.py --definition out.json [--graph dag.png]   build offline, no AWS needed
  python run_pipeline.py --execute [--wait] [--param K=V ...]       upsert + start on SageMaker
  python run_pipeline.py --local --execute [--param K=V ...]        run the same definition here
  python run_pipeline.py [--local] --execute --definition-file PATH  run a definition JSON as it is
  python run_pipeline.py --prepare-data [--data PATH]              fetch/verify/upload dogImages
  python run_pipeline.py --serve MODEL [--port 8080]               local endpoint
  python run_pipeline.py --serve MODEL --runtime sagemaker         ... under the real SageMaker serving stack
  python run_pipeline.py --invoke TARGET IMAGE...                  ask an endpoint
  python run_pipeline.py --cleanup [--yes]                         delete what the pipeline deployed

This file only parses arguments (refusing flags that would be ignored), builds or reads the
definition once and hands it to a runner; the work lives in pipeline/. `main` is the one place
where errors become one line on stderr and an exit status (pipeline/errors.py).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="pipeline config (default: pipeline.yaml)")
    p.add_argument("--region", help="override config region (also AWS_REGION)")
    p.add_argument("--role", help="override config role ARN (also SAGEMAKER_ROLE_ARN)")
    p.add_argument("--bucket", help="override config bucket (also SAGEMAKER_BUCKET)")

    build = p.add_argument_group("build")
    build.add_argument("--definition", metavar="OUT.json", help="write the pipeline definition JSON")
    build.add_argument("--graph", metavar="DAG.png", help="draw the DAG")
    build.add_argument("--definition-file", metavar="PATH",
                       help="use this definition JSON as it is instead of building one (--execute, --graph)")

    run = p.add_argument_group("run")
    run.add_argument("--execute", action="store_true", help="run the pipeline (AWS, or here with --local)")
    run.add_argument("--local", action="store_true", help="run on this machine: no AWS, no Docker")
    run.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="pipeline parameter override")
    run.add_argument("--run-dir", help="--local: where the run record, logs and report go (default runs/<name>)")
    run.add_argument("--keep-endpoint", action="store_true", help="--local: keep the endpoint up after the run")
    run.add_argument("--wait", action="store_true", help="AWS: wait for the execution and show step statuses")
    run.add_argument("--display-name", help="AWS: execution display name (default: commit SHA in CI)")
    run.add_argument("--cleanup", action="store_true",
                     help="AWS: delete endpoints/configs/models this pipeline created")
    run.add_argument("--yes", action="store_true", help="--cleanup: do not ask before deleting")

    data = p.add_argument_group("data")
    data.add_argument("--prepare-data", action="store_true", help="download, verify and upload dogImages")
    data.add_argument("--data", metavar="PATH", help="use a dataset folder (or zip) already on disk")

    serve = p.add_argument_group("endpoint")
    serve.add_argument("--serve", metavar="MODEL", help="serve a model.tar.gz or model dir over HTTP")
    serve.add_argument("--host", help="--serve: address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="--serve: default SAGEMAKER_BIND_TO_PORT or 8080")
    serve.add_argument("--runtime", choices=("local", "sagemaker"),
                       help="--serve / --local's endpoint: our fast server (local, the default) or the PyTorch "
                            "inference image's own stack, sagemaker-pytorch-inference + TorchServe (sagemaker; "
                            "needs Java and `python -m pipeline.runtime.toolkits`)")
    serve.add_argument("--invoke", nargs="+", metavar=("TARGET", "IMAGE"), help="URL or endpoint name, then images")
    serve.add_argument("--json", action="store_true", help="--invoke: print the raw JSON answer")
    args = p.parse_args(argv)
    problem = usage_problem(args)
    if problem:
        p.error(problem)
    args.config = args.config or str(ROOT / "pipeline.yaml")
    args.runtime = args.runtime or "local"
    args.host = args.host or "127.0.0.1"
    return args


def usage_problem(args: argparse.Namespace) -> str | None:
    """The first flag that would be ignored in this combination, as one line saying what it goes
    with (argparse prints it with the usage, exit 2); None when the command line is coherent."""
    if args.invoke is not None and len(args.invoke) < 2:
        return "--invoke needs a TARGET and at least one IMAGE"
    modes = [flag for flag, on in (("--serve", args.serve), ("--invoke", args.invoke), ("--cleanup", args.cleanup))
             if on]
    builds = [flag for flag, on in (("--execute", args.execute), ("--prepare-data", args.prepare_data),
                                    ("--definition", args.definition), ("--graph", args.graph),
                                    ("--definition-file", args.definition_file)) if on]
    if len(modes) > 1 or modes and builds:
        return f"{(modes + builds)[0]} and {(modes + builds)[1]} do not go together: --serve, --invoke and " \
               f"--cleanup are commands of their own"
    local_run = args.local and args.execute
    aws_run = args.execute and not args.local
    rules = (  # (flag given, allowed here, what it goes with)
        ("--local", args.local, args.execute or args.prepare_data, "--execute or --prepare-data"),
        ("--runtime", args.runtime, args.serve or local_run,
         "--serve or --local --execute (on AWS the endpoint is SageMaker's own)"),
        ("--host", args.host, args.serve and args.runtime != "sagemaker",
         "--serve (--runtime local; the SageMaker stack binds where SageMaker's contract says)"),
        ("--port", args.port is not None, args.serve, "--serve"),
        ("--json", args.json, args.invoke, "--invoke"),
        ("--yes", args.yes, args.cleanup, "--cleanup"),
        ("--wait", args.wait, aws_run, "--execute on AWS (a local run always waits)"),
        ("--display-name", args.display_name, aws_run, "--execute on AWS"),
        ("--keep-endpoint", args.keep_endpoint, local_run, "--local --execute"),
        ("--run-dir", args.run_dir, local_run, "--local --execute"),
        ("--param", args.param, args.execute, "--execute"),
        ("--data", args.data, args.prepare_data or local_run, "--prepare-data or --local --execute"),
        ("--definition-file", args.definition_file, args.execute or args.graph, "--execute or --graph"),
        ("--role", args.role, not (args.serve or args.invoke), "commands that read the config (not --serve/--invoke)"),
        ("--bucket", args.bucket, not (args.serve or args.invoke),
         "commands that read the config (not --serve/--invoke)"),
        ("--config", args.config, not (args.serve or args.invoke),
         "commands that read the config (not --serve/--invoke)"),
        ("--region", args.region, not args.serve, "commands that talk to AWS or read the config (not --serve)"),
    )
    for flag, given, allowed, goes_with in rules:
        if given and not allowed:
            return f"{flag} goes with {goes_with}"
    return None


def one_line(err: BaseException) -> str:
    """`error: <what>; <what would be valid>` on one line, whatever the error's own layout."""
    if isinstance(err, OSError) and err.strerror and err.filename:  # not "[Errno 2] No such file..."
        text = f"{err.filename}: {err.strerror}"
    else:
        text = _aws_refusal(err) or str(err) or type(err).__name__
    lines = [bullet for line in text.splitlines() if (bullet := re.sub(r"^- +", "", line.strip()))]
    text = "".join(line if i == 0 else (" " if lines[i - 1].endswith(":") else "; ") + line
                   for i, line in enumerate(lines))  # "not valid:\n  - a\n  - b" -> "not valid: a; b"
    return "error: " + (text if len(text) <= 2000 else text[:1997] + "...")


def _aws_refusal(err: BaseException) -> str | None:
    """botocore's ClientError (AWS refused a call) as a SetupError would say it; None for anything else.
    (botocore is looked up, not imported: only a command that loaded it can have raised it.)"""
    exceptions = sys.modules.get("botocore.exceptions")
    if exceptions is None or not isinstance(err, exceptions.ClientError):
        return None
    error = err.response.get("Error", {})
    return f"AWS refused {err.operation_name}: {error.get('Code', '')}: {error.get('Message', '')}"


def main(argv: list[str] | None = None) -> int:
    """The one place where errors become one line on stderr and an exit status (README, "Errors and
    exit codes"); argparse's usage errors exit 2 before this."""
    return guarded(run, parse_args(argv))


def guarded(command, *args, **kwargs) -> int:
    """Run `command` under the error policy: our error types (pipeline/errors.py), AWS refusals and
    OS errors (a file that cannot be read) become `error: ...` and exit 1; anything else is a bug
    and keeps its traceback."""
    from pipeline.errors import PipelineError
    try:
        return command(*args, **kwargs)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - ours become one line; anything else is a bug: traceback
        if not isinstance(err, (PipelineError, OSError)) and _aws_refusal(err) is None:
            raise
        print(one_line(err), file=sys.stderr)
        return getattr(err, "exit_code", 1)


def run(args: argparse.Namespace) -> int:
    if args.serve:
        if args.runtime == "sagemaker":
            from pipeline.runtime.serving import serve as serve_sagemaker
            return serve_sagemaker(args.serve, port=args.port)
        from pipeline.serve import serve
        return serve(args.serve, host=args.host, port=args.port)
    if args.invoke:
        from pipeline.invoke import invoke
        return invoke(args.invoke[0], args.invoke[1:], raw_json=args.json, region=args.region)

    from pipeline.config import load_config
    cfg = load_config(args.config, region=args.region, role=args.role, bucket=args.bucket)
    if args.cleanup:
        from pipeline.aws import cleanup
        return cleanup(cfg, assume_yes=args.yes)
    if args.prepare_data:
        from pipeline.data import prepare_data
        prepare_data(cfg, source=args.data, store=_local_store() if args.local else None)
        if not args.execute:
            return 0

    # One definition for every use below: built once from the config, or read as it is.
    built = None
    if args.definition_file:
        from pipeline.local.document import load_definition
        definition = Path(args.definition_file).read_text()
        load_definition(definition, args.definition_file)  # JSON with Steps, or one line naming the file
    else:
        from pipeline.definition import build
        built = build(cfg)  # the definition JSON, and the objects (code tarball) it expects in S3
        definition = built.definition

    def uploads() -> dict[str, bytes]:
        """What the definition expects in S3 besides the data: the code tarballs the build makes.
        With --definition-file, built only when asked for, and only what that file names."""
        if built is not None:
            return built.uploads
        from pipeline.definition import build
        return {uri: body for uri, body in build(cfg).uploads.items() if uri in definition}

    if args.definition:
        from pipeline.files import atomic_write
        print(f"wrote {atomic_write(args.definition, definition)}")
    if args.graph:
        from pipeline.graph import draw_dag
        draw_dag(definition, args.graph)
        print(f"wrote {args.graph}")
    if args.execute and args.local:
        from pipeline import local_run
        return local_run.execute(cfg, definition, uploads=uploads, source=args.definition_file or "built from config",
                                 params=args.param, run_dir=args.run_dir, data=args.data,
                                 keep_endpoint=args.keep_endpoint, endpoint_runtime=args.runtime)
    if args.execute:
        from pipeline.aws import execute
        return execute(cfg, definition, params=args.param, wait=args.wait, display_name=args.display_name,
                       uploads=uploads())
    if not (args.definition or args.graph):
        print(definition)
    return 0


def _local_store():
    from pipeline.local.store import LocalStore
    return LocalStore()


if __name__ == "__main__":
    sys.exit(main())
