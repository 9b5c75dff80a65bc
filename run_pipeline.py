#!/usr/bin/env python3
"""Build, run and serve the dog-breed pipeline.

  python run_pipeline.py --definition out.json [--graph dag.png]   build offline, no AWS needed
  python run_pipeline.py --execute [--wait] [--param K=V ...]       upsert + start on SageMaker
  python run_pipeline.py --local --execute [--param K=V ...]        run the same definition here
  python run_pipeline.py --prepare-data [--data PATH]              fetch/verify/upload dogImages
  python run_pipeline.py --serve MODEL [--port 8080]               local endpoint
  python run_pipeline.py --serve MODEL --runtime sagemaker         ... under the real SageMaker serving stack
  python run_pipeline.py --invoke TARGET IMAGE...                  ask an endpoint
  python run_pipeline.py --cleanup [--yes]                         delete what the pipeline deployed

This file only parses arguments; the work lives in pipeline/.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "pipeline.yaml"), help="pipeline config (default: pipeline.yaml)")
    p.add_argument("--region", help="override config region (also AWS_REGION)")
    p.add_argument("--role", help="override config role ARN (also SAGEMAKER_ROLE_ARN)")
    p.add_argument("--bucket", help="override config bucket (also SAGEMAKER_BUCKET)")

    build = p.add_argument_group("build")
    build.add_argument("--definition", metavar="OUT.json", help="write the pipeline definition JSON")
    build.add_argument("--graph", metavar="DAG.png", help="draw the DAG")

    run = p.add_argument_group("run")
    run.add_argument("--execute", action="store_true", help="run the pipeline (AWS, or here with --local)")
    run.add_argument("--local", action="store_true", help="run on this machine: no AWS, no Docker")
    run.add_argument("--definition-file", metavar="PATH", help="--local: execute this definition JSON as it is")
    run.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="pipeline parameter override")
    run.add_argument("--run-dir", help="--local: where the run record, logs and report go (default runs/<name>)")
    run.add_argument("--keep-endpoint", action="store_true", help="--local: keep the endpoint up after the run")
    run.add_argument("--wait", action="store_true", help="AWS: wait for the execution and show step statuses")
    run.add_argument("--display-name", help="AWS: execution display name (default: commit SHA in CI)")
    run.add_argument("--cleanup", action="store_true",
                     help="AWS: delete endpoints/configs/models this pipeline created")
    run.add_argument("--yes", action="store_true", help="do not ask before deleting")

    data = p.add_argument_group("data")
    data.add_argument("--prepare-data", action="store_true", help="download, verify and upload dogImages")
    data.add_argument("--data", metavar="PATH", help="use a dataset folder (or zip) already on disk")

    serve = p.add_argument_group("endpoint")
    serve.add_argument("--serve", metavar="MODEL", help="serve a model.tar.gz or model dir over HTTP")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=None, help="default: SAGEMAKER_BIND_TO_PORT or 8080")
    serve.add_argument("--runtime", choices=("local", "sagemaker"), default="local",
                       help="--serve / --local's endpoint: our fast server (local) or the PyTorch inference "
                            "image's own stack, sagemaker-pytorch-inference + TorchServe (sagemaker; needs Java "
                            "and `python -m pipeline.runtime.toolkits`)")
    serve.add_argument("--invoke", nargs="+", metavar=("TARGET", "IMAGE"), help="URL or endpoint name, then images")
    serve.add_argument("--json", action="store_true", help="--invoke: print the raw JSON answer")
    args = p.parse_args(argv)
    if args.invoke is not None and len(args.invoke) < 2:
        p.error("--invoke needs a TARGET and at least one IMAGE")
    if args.local and not args.execute and not args.prepare_data:
        p.error("--local goes with --execute or --prepare-data")
    if args.runtime != "local" and not (args.serve or (args.local and args.execute)):
        p.error("--runtime goes with --serve or --local --execute (on AWS the endpoint is SageMaker's own)")
    return args


def _user_errors() -> tuple[type[BaseException], ...]:
    """Our error types for bad input, setup or a refused run: each is one line and exit 1.
    (Imported only when something failed, so a quick command stays quick.)"""
    from pipeline.config import ConfigError
    from pipeline.data import DataError
    from pipeline.invoke import InvokeError
    from pipeline.local.store import StoreError
    from pipeline.params import ParameterError
    from pipeline.serve import ServeError
    errors = [ConfigError, DataError, InvokeError, ParameterError, ServeError, StoreError, OSError]
    for module, names in (("pipeline.aws", ("AwsSetupError",)),
                          ("pipeline.local.executor", ("DefinitionError",)),
                          ("pipeline.local.tuner", ("TuningError",)),
                          ("pipeline.local.expressions", ("ExpressionError",))):
        if module in sys.modules:  # only modules that ran can have raised
            errors += [getattr(sys.modules[module], name) for name in names]
    return tuple(errors)


def one_line(err: BaseException) -> str:
    """`error: <what>; <what would be valid>` on one line, whatever the error's own layout."""
    if isinstance(err, OSError) and err.strerror and err.filename:  # not "[Errno 2] No such file..."
        text = f"{err.filename}: {err.strerror}"
    else:
        text = str(err) or type(err).__name__
    lines = [line.strip(" -") for line in text.splitlines() if line.strip(" -")]
    text = "".join(line if i == 0 else (" " if lines[i - 1].endswith(":") else "; ") + line
                   for i, line in enumerate(lines))  # "not valid:\n  - a\n  - b" -> "not valid: a; b"
    return "error: " + (text if len(text) <= 2000 else text[:1997] + "...")


def main(argv: list[str] | None = None) -> int:
    """The one place where our error types become one line on stderr and exit status 1
    (README, "Errors and exit codes"); argparse's usage errors exit 2 before this."""
    args = parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - ours become one line; anything else is a bug: traceback
        if not isinstance(err, _user_errors()):
            raise
        print(one_line(err), file=sys.stderr)
        return 1


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

    if args.prepare_data:
        from pipeline.data import prepare_data
        prepare_data(cfg, source=args.data, local=args.local)
        if not args.execute:
            return 0
    if args.cleanup:
        from pipeline.aws import cleanup
        return cleanup(cfg, assume_yes=args.yes)
    if args.local and args.execute:
        from pipeline.local.executor import run_local
        return run_local(cfg, definition_file=args.definition_file, params=args.param,
                         run_dir=args.run_dir, data=args.data, keep_endpoint=args.keep_endpoint,
                         endpoint_runtime=args.runtime)

    from pipeline.definition import build
    built = build(cfg)  # the definition JSON, and the objects (code tarball) it expects in S3
    definition = built.definition
    if args.definition:
        from pipeline.files import atomic_write
        print(f"wrote {atomic_write(args.definition, definition)}")
    if args.graph:
        from pipeline.graph import draw_dag
        draw_dag(definition, args.graph)
        print(f"wrote {args.graph}")
    if args.execute:
        from pipeline.aws import execute
        return execute(cfg, definition, params=args.param, wait=args.wait, display_name=args.display_name,
                       uploads=built.uploads)
    if not (args.definition or args.graph):
        print(definition)
    return 0


if __name__ == "__main__":
    sys.exit(main())
