"""Run the pipeline on this machine: the local runner's host side, shaped like pipeline/aws.py.

    python run_pipeline.py --local --execute [--param Name=Value] [--definition-file PATH]

What AWS has before an execution starts, this puts in place, then hands the definition JSON
and the object store to the interpreter (pipeline/local/executor.py), which reads nothing else:

    data   --data PATH, or the config's `sample` block, at the data URI in the local store
    code   the source archives the definition names (sagemaker_submit_directory), as the
           build uploads them to S3
    run    runs/<pipeline name> (or --run-dir): execution record, logs, report; one run at a time
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from pipeline.errors import ExecutionFailed
from pipeline.local.document import load_definition
from pipeline.local.executor import execute as interpret
from pipeline.local.store import REPO_ROOT, LocalStore
from pipeline.s3uri import code_uris


def _ensure_data(cfg, store: LocalStore, data: str | None) -> None:
    """--data PATH puts a dataset folder at the data URI; else a config `sample` block
    generates the small dataset there (once)."""
    uri, sample = cfg.data.uri, cfg.data.sample
    if data:
        from pipeline.data import prepare_dataset
        # a folder or a zip, checked for the train/valid/test layout; any number of classes
        prepare_dataset(uri, data, store=store, strict=False)
    elif sample and not store.exists(uri):
        from pipeline.sample_data import generate_dataset
        print(f"generating the sample dataset at {uri} ({sample.model_dump()}) ...")
        generate_dataset(store.path(uri), num_classes=sample.num_classes, per_class=tuple(sample.per_class),
                         size=sample.image_size, seed=sample.seed)


def _missing_code(definition: dict, store: LocalStore) -> list[str]:
    """The source archives (sagemaker_submit_directory) the definition names but the store lacks."""
    return [uri for uri in code_uris(definition) if not store.exists(uri)]


def execute(cfg, definition: str, *, uploads: Callable[[], dict[str, bytes]], source: str = "definition",
            params=(), run_dir=None, data=None, keep_endpoint=False, endpoint_runtime: str = "local",
            store: LocalStore | None = None) -> int:
    """Put data and code in the local store, then interpret `definition`. Returns 0 (130 when
    interrupted; the run resumes when started again); raises DefinitionError / DataError / RecordError
    for bad input and ExecutionFailed when the execution ends Failed.

    `uploads()` gives what the build puts in S3 (the code tarballs); it is called only when the
    definition names code the store lacks, so a definition file whose code is there needs no build.
    """
    store = store or LocalStore()
    name = cfg.pipeline.name
    run_dir = Path(run_dir) if run_dir else REPO_ROOT / "runs" / name
    _ensure_data(cfg, store, data)
    parsed = load_definition(definition, source)
    if _missing_code(parsed, store):
        for uri, body in uploads().items():
            store.put_bytes(uri, body)
    t0 = time.monotonic()
    try:
        record = interpret(parsed, store=store, run_dir=run_dir, params=list(params or []), pipeline_name=name,
                           keep_endpoint=keep_endpoint, endpoint_runtime=endpoint_runtime)
    except KeyboardInterrupt:  # the record says Stopped; the interpreter said how to resume
        return 130
    status = record["PipelineExecutionStatus"]
    print(f"execution {record['PipelineExecutionId']}: {status} in {time.monotonic() - t0:.0f}s; "
          f"record {run_dir / 'execution.json'}")
    if status != "Succeeded":
        reason = (f"FailStep: {record['FailStepMessage']}" if record.get("FailStepMessage") is not None
                  else f"failed: {record.get('FailureReason')}")
        raise ExecutionFailed(f"execution {record['PipelineExecutionId']} {status}: {reason}")
    return 0
