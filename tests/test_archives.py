"""The one safe extractor (pipeline/archives.py) for model, code and data archives, and the
formats written once (pipeline/formats.py)."""
import io
import json
import tarfile

import pytest

from pipeline import archives, formats
from pipeline.local.jobs import run_training_job
from pipeline.local.store import LocalStore


def _tar(path, name, kind=tarfile.REGTYPE, link="", body=b"x"):
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, link
        info.size = len(body) if kind == tarfile.REGTYPE else 0
        tar.addfile(info, io.BytesIO(body) if kind == tarfile.REGTYPE else None)
    return path


@pytest.mark.parametrize("name,kind,link,says", [
    ("/abs", tarfile.REGTYPE, "", "absolute path"),
    ("a/../../evil", tarfile.REGTYPE, "", "'..'"),
    ("link", tarfile.SYMTYPE, "/etc/passwd", "outside"),
    ("fifo", tarfile.FIFOTYPE, "", "device or fifo"),
])
def test_a_bad_tar_member_is_refused_before_anything_is_written(tmp_path, name, kind, link, says):
    archive = _tar(tmp_path / "a.tar.gz", name, kind, link)
    with pytest.raises(archives.ArchiveRefused, match=says):
        archives.extract_tar(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_training_job_extracts_its_code_with_the_same_checks(tmp_path):
    store = LocalStore(tmp_path / "store")
    store.put_file("s3://b/code/sourcedir.tar.gz", _tar(tmp_path / "src.tar.gz", "../escape.py"))
    request = {"HyperParameters": {"sagemaker_program": json.dumps("train.py"),
                                   "sagemaker_submit_directory": json.dumps("s3://b/code/sourcedir.tar.gz")},
               "AlgorithmSpecification": {}, "OutputDataConfig": {"S3OutputPath": "s3://b/out"}}
    with pytest.raises(archives.ArchiveRefused, match="'..'"):
        run_training_job("job", request, store, tmp_path / "job")
    assert not (tmp_path / "escape.py").exists() and not (tmp_path / "job" / "escape.py").exists()


@pytest.mark.parametrize("text,seconds", [("P30D", 30 * 86400), ("PT1H", 3600), ("P1DT12H", 129600),
                                          ("P", None), ("PT", None), ("P1DT", None), ("30 days", None),
                                          ("P1D\n", None)])
def test_iso_8601_durations(text, seconds):
    assert formats.duration_seconds(text) == seconds
    assert bool(formats.ISO_DURATION.match(text)) == (seconds is not None)


@pytest.mark.parametrize("arn,name", [("arn:aws:iam::123456789012:role/dogbreed", "dogbreed"),
                                      ("arn:aws-cn:iam::123456789012:role/service-role/x", "x"),
                                      ("arn:aws:iam::123456789012:roleX", None),
                                      ("arn:aws:iam::12345:role/x", None),
                                      ("arn:aws:iam::123456789012:role/" + "n" * 65, None)])
def test_role_arns(arn, name):
    m = formats.ROLE_ARN.match(arn)
    assert (m.group(2) if m else None) == name
