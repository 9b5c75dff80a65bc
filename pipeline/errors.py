"""One error policy for every command of run_pipeline.py (README: "Errors and exit codes").

    UserError        bad input: a config key, a flag, a parameter, a file, the data, a model archive,
                     a definition JSON, a damaged run record
    SetupError       the environment or AWS refused: region, credentials, role, bucket, permissions
    ExecutionFailed  a pipeline execution that ended Failed; the message is its failure reason

Every error type of the host code is one of these (ConfigError, DataError, ... subclass them and
keep the builtin base they had). Each means one line on stderr and exit status 1, and only
run_pipeline.main prints them: code below it raises, it never prints-and-returns an error.
"""
from __future__ import annotations


class PipelineError(Exception):
    """Base of the three; `exit_code` is what run_pipeline.main returns for it."""
    exit_code = 1


class UserError(PipelineError):
    """Something the user wrote or gave is not valid; the message names it and what would be."""


class SetupError(PipelineError):
    """The environment (AWS account, credentials, a busy resource) refused; the message says what to fix."""


class ExecutionFailed(PipelineError):
    """A pipeline execution ended Failed (locally or on SageMaker); the message is its failure reason."""


class DefinitionError(UserError, ValueError):
    """A definition JSON (or a parameter override of it) is not valid: the message says where.
    Both runners refuse with it; the local interpreter also fails a step with it."""
