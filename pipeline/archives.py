"""Safe extraction of the archives the host reads: model.tar.gz (serving), sourcedir.tar.gz
(local training jobs) and the dataset zip. Every member is checked before anything is
written; a refusal is one line naming the archive, the member and why.

Neutral: imports nothing of the runners (pipeline.local, pipeline.aws) or the config.
"""
from __future__ import annotations

import os
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from pipeline.errors import UserError

CHUNK = 1 << 20


class ArchiveRefused(UserError, ValueError):
    """An archive member that would write outside the target, or is not a plain file/folder."""


# ---------------------------------------------------------------- tar (model.tar.gz, sourcedir.tar.gz)

def check_tar_member(member: tarfile.TarInfo, dest: Path, archive, error=ArchiveRefused) -> None:
    path = PurePosixPath(member.name)
    where = f"{archive}: member {member.name!r}"
    if path.is_absolute() or member.name.startswith(("/", "\\")):
        raise error(f"{where} has an absolute path: a model archive holds relative paths only")
    if ".." in path.parts:
        raise error(f"{where} contains '..': a model archive must not write outside its dir")
    if member.issym() or member.islnk():
        target = PurePosixPath(member.linkname)
        resolved = (dest / path.parent / target) if member.issym() else (dest / target)
        if target.is_absolute() or not os.path.normpath(resolved).startswith(str(dest) + os.sep):
            raise error(f"{where} links to {member.linkname!r}, outside the model dir")
    elif not (member.isfile() or member.isdir()):
        raise error(f"{where} is a device or fifo: a model archive holds files and dirs only")


def extract_tar(archive: str | os.PathLike, dest: str | os.PathLike, error=ArchiveRefused) -> Path:
    """Unpack a tar(.gz) into dest, refusing members that would land outside it."""
    dest = Path(dest).resolve()
    with tarfile.open(archive, "r:*") as tar:
        for member in tar.getmembers():
            check_tar_member(member, dest, archive, error)
        dest.mkdir(parents=True, exist_ok=True)
        tar.extractall(dest, filter="data")  # the stdlib's own guard as a second line
    return dest


# ---------------------------------------------------------------- zip (the dataset)

ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)


def check_zip_member(info: zipfile.ZipInfo, zip_path: Path, error=ArchiveRefused) -> None:
    name = info.filename
    parts = PurePosixPath(name).parts
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or "\\" in name:
        raise error(f"{zip_path}: refusing member {name!r}: absolute or Windows-style path")
    if ".." in parts:
        raise error(f"{zip_path}: refusing member {name!r}: '..' would write outside the target folder")
    if info.flag_bits & 0x1:
        raise error(f"{zip_path}: refusing member {name!r}: it is encrypted; use an unencrypted zip")
    if info.compress_type not in ZIP_METHODS:
        raise error(f"{zip_path}: refusing member {name!r}: compression method {info.compress_type} is not "
                    f"supported; use stored or deflated members")
    if any(len(part.encode()) > 255 for part in parts) or len(name.encode()) > 1024:
        raise error(f"{zip_path}: refusing member {name[:60]!r}...: a name over 255 bytes per folder "
                    f"(1024 in all) cannot be written here")
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        what = "symbolic link" if kind == stat.S_IFLNK else "special file"
        raise error(f"{zip_path}: refusing member {name!r}: a {what}; only regular files and folders are allowed")


def check_zip(zf: zipfile.ZipFile, zip_path: Path, error=ArchiveRefused) -> list[zipfile.ZipInfo]:
    """Every member checked, and the set as a whole (no duplicates, no file that is also a folder)."""
    members = zf.infolist()
    files, folders = set(), set()
    for info in members:
        check_zip_member(info, zip_path, error)
        path = PurePosixPath(info.filename)
        if not info.is_dir() and str(path) in files:
            raise error(f"{zip_path}: member {info.filename!r} appears twice; a dataset zip holds each "
                        f"file once")
        (folders if info.is_dir() else files).add(str(path))
        folders.update(str(p) for p in path.parents)
    clash = sorted(files & folders)
    if clash:
        raise error(f"{zip_path}: {clash[0]!r} is both a file and a folder in the zip; rebuild the zip")
    return members


def extract_zip_members(zf: zipfile.ZipFile, members: list[zipfile.ZipInfo], dest: Path, zip_path: Path,
                        error=ArchiveRefused, on_member: Callable[[], None] | None = None) -> None:
    """Write check_zip's members under dest (a fresh folder); on_member after each."""
    for info in members:
        target = (dest / info.filename).resolve()
        if not target.is_relative_to(dest.resolve()):  # belt and braces over check_zip_member
            raise error(f"{zip_path}: member {info.filename!r} escapes the target folder")
        if info.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with zf.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
            except (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError,
                    OSError) as e:  # bad CRC, corrupt deflate stream, truncated, encrypted, ...
                raise error(f"{zip_path}: member {info.filename!r} cannot be extracted "
                            f"({type(e).__name__}: {' '.join(str(e).split())}); the zip is corrupt: "
                            f"delete it and download or build it again") from None
        if on_member is not None:
            on_member()
