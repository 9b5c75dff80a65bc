"""`--prepare-data`: fetch dogImages.zip, extract it safely, verify it, upload it to the data URI.

    download (HTTP Range resume, size + sha256) -> safe_extract -> verify_dataset -> upload
    (S3 with multipart and skip-unchanged, or the local object store for --local)

A folder or zip already on disk (`--data PATH`) skips the download.
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import http.client
import json
import os
import re
import shutil
import sys
import threading
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import TextIO

from pipeline import archives
from pipeline.errors import UserError
from pipeline.files import atomic_dir, atomic_write
from pipeline.s3uri import split_s3_uri
from pipeline.sample_data import DOG_CLASS_DIRS, DOG_SPLIT_SIZES, SPLITS

DOGIMAGES_URL = "https://s3-us-west-1.amazonaws.com/udacity-aind/dog-project/dogImages.zip"
# Udacity publishes no checksum for dogImages.zip. The first download records its own size and
# sha256 next to the file (<zip>.sha256.json) and later runs check against that record; put the
# hash in the config (data.sha256) to pin it across machines.
DOGIMAGES_SHA256: str | None = None
DEFAULT_CACHE = Path(__file__).resolve().parents[1] / "data"
CHUNK = 1 << 20
S3_PART = 8 << 20  # multipart threshold and part size; fixed so that ETags can be recomputed here


class DataError(UserError, RuntimeError):
    """A problem with the data the user must fix; the message names the file and what is expected."""


class _Progress:
    """One self-overwriting line on a terminal; a line per 10% otherwise (CI logs)."""

    def __init__(self, label: str, total: int | None, unit: str = "MB", scale: float = 1e6, out: TextIO = sys.stdout):
        self.label, self.total, self.unit, self.scale, self.out = label, total, unit, scale, out
        self.tty = hasattr(out, "isatty") and out.isatty()
        self.start, self.last, self.last_decile, self.done = time.monotonic(), 0.0, -1, 0
        self.lock = threading.Lock()

    def update(self, n: int, base: int = 0) -> None:
        with self.lock:
            self.done += n
            now = time.monotonic()
            pct = 100 * (base + self.done) / self.total if self.total else 0.0
            if self.tty and now - self.last < 0.5 and base + self.done != self.total:
                return
            if not self.tty and int(pct // 10) == self.last_decile and base + self.done != self.total:
                return
            self.last, self.last_decile = now, int(pct // 10)
            rate = self.done / self.scale / max(now - self.start, 1e-6)
            total = f"/{self.total / self.scale:.1f}" if self.total else ""
            line = f"{self.label}: {pct:5.1f}% {(base + self.done) / self.scale:.1f}{total} {self.unit} " \
                   f"({rate:.1f} {self.unit}/s)"
            print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=self.out, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=self.out)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _fetch_into(url: str, part: Path, timeout: float, out: TextIO) -> int:
    """Append the rest of `url` to `part` (Range resume); return the full size."""
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        m = re.match(r"bytes \*/(\d+)", e.headers.get("Content-Range", "") or "")
        if e.code == 416 and m and int(m.group(1)) == have:
            return have  # the partial file is already whole
        raise DataError(f"download of {url} failed: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise DataError(f"cannot reach {url}: {e.reason}") from None
    with resp:
        length = int(resp.headers.get("Content-Length") or 0)
        if resp.status == 206:
            m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != have:
                raise DataError(f"{url}: server answered the resume with an unexpected range "
                                f"{resp.headers.get('Content-Range')!r}; delete {part} and run again")
            total = int(m.group(2)) if m.group(2) != "*" else have + length
            mode = "ab"
            print(f"resuming {part.name} at {have / 1e6:.1f} MB", file=out)
        else:  # 200: the server ignored Range (or there was nothing to resume): start over
            have, total, mode = 0, length, "wb"
        bar = _Progress(f"downloading {part.name[:-5]}", total or None, out=out)
        try:
            with open(part, mode) as f:
                while True:
                    block = resp.read(CHUNK)
                    if not block:
                        break
                    f.write(block)
                    bar.update(len(block), base=have)
        finally:
            bar.close()
    return total or part.stat().st_size


def download(url: str, dest: Path, sha256: str | None = None, retries: int = 3, timeout: float = 60.0,
             out: TextIO = sys.stdout) -> Path:
    """Download `url` to `dest`, resuming a `dest.part` left by an earlier try.

    The finished file's size and sha256 are recorded in `dest.sha256.json`; a later call with
    the file present checks its size against the record (and the sha256 against `sha256`).
    """
    dest = Path(dest)
    record_path = dest.with_name(dest.name + ".sha256.json")
    if dest.exists() and record_path.exists():
        record = json.loads(record_path.read_text())
        if dest.stat().st_size == record["size"] and (not sha256 or sha256 == record["sha256"]):
            return dest
        raise DataError(f"{dest} does not match its record {record_path} (size {dest.stat().st_size} vs "
                        f"{record['size']}, or sha256 vs the expected {sha256}); delete both and run again")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if dest.exists():  # put there by hand: check it like a fresh download instead of fetching again
        os.replace(dest, part)
        return _finish(url, part, dest, record_path, part.stat().st_size, sha256, out)
    for attempt in range(1, retries + 1):
        try:
            total = _fetch_into(url, part, timeout, out)
        except (OSError, http.client.HTTPException) as e:  # dropped connection, timeout, IncompleteRead
            if attempt == retries:
                have = part.stat().st_size if part.exists() else 0
                raise DataError(f"download of {url} interrupted {retries} times ({e}); "
                                f"run again to resume from {have} bytes") from None
            print(f"download interrupted ({e.__class__.__name__}); resuming", file=out)
            continue
        if part.stat().st_size == total:
            break
        if attempt == retries:
            raise DataError(f"download of {url} ended at {part.stat().st_size} of {total} bytes; run again to resume")
    return _finish(url, part, dest, record_path, total, sha256, out)


def _finish(url: str, part: Path, dest: Path, record_path: Path, total: int, sha256: str | None,
            out: TextIO) -> Path:
    digest = sha256_file(part)
    if sha256 and digest != sha256:
        part.unlink()
        raise DataError(f"checksum mismatch for {url}: expected sha256 {sha256}, got {digest}; "
                        f"the file was removed: run again, or fix data.sha256")
    atomic_write(record_path, json.dumps({"url": url, "size": total, "sha256": digest}, indent=1))
    os.replace(part, dest)
    note = "" if sha256 else " (no expected hash configured: recorded this one)"
    print(f"downloaded {dest} ({total / 1e6:.1f} MB, sha256 {digest}){note}", file=out)
    return dest


# ---------------------------------------------------------------- safe extraction

def safe_extract(zip_path: Path, dest: Path, out: TextIO = sys.stdout) -> Path:
    """Extract into `dest` (replaced whole), after checking every member; nothing is written if one is bad."""
    zip_path, dest = Path(zip_path), Path(dest)
    try:
        zf = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile as e:
        raise DataError(f"{zip_path} is not a valid zip file ({e}); delete it and run again") from None
    with zf:
        members = archives.check_zip(zf, zip_path, error=DataError)
        need = sum(i.file_size for i in members)
        dest.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(dest.parent).free
        if need > free:
            raise DataError(f"extracting {zip_path} needs {need / 1e9:.1f} GB, "
                            f"{dest.parent} has {free / 1e9:.1f} GB free")
        with atomic_dir(dest) as tmp:
            bar = _Progress(f"extracting {zip_path.name}", len(members), unit="files", scale=1, out=out)
            archives.extract_zip_members(zf, members, tmp, zip_path, error=DataError, on_member=lambda: bar.update(1))
            bar.close()
    return dest


# ---------------------------------------------------------------- verification

def find_root(path: Path) -> Path:
    """The folder holding train/ valid/ test/: `path` itself or its one real subfolder (e.g. dogImages/)."""
    path = Path(path)
    if all((path / s).is_dir() for s in SPLITS):
        return path
    subs = ([p for p in path.iterdir() if p.is_dir() and not p.name.startswith((".", "__MACOSX"))]
            if path.is_dir() else [])
    if len(subs) == 1 and all((subs[0] / s).is_dir() for s in SPLITS):
        return subs[0]
    raise DataError(f"{path} has no {'/, '.join(SPLITS)}/ folders (nor a single subfolder with them)")


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]


def verify_dataset(root: Path, strict: bool = True) -> dict[str, dict[str, int]]:
    """Check the dogImages layout; return {split: {class: image count}}.

    Always: the three splits exist, hold the same class folders, and no class is empty.
    strict (the real dogImages): its 133 class folders and split sizes 6,680 / 835 / 836.
    """
    root = Path(root)
    errors, counts = [], {}
    for split in SPLITS:
        if not (root / split).is_dir():
            errors.append(f"missing folder {root / split}")
            continue
        counts[split] = {d.name: len(_files(d)) for d in sorted((root / split).iterdir()) if d.is_dir()}
        stray = [p.name for p in _files(root / split)]
        if stray:
            errors.append(f"{split}/ has files outside class folders: {', '.join(stray[:5])}")
        empty = [c for c, n in counts[split].items() if n == 0]
        if empty:
            errors.append(f"{split}/ has empty class folders: {', '.join(empty[:5])}")
    for split, found in counts.items():
        if len(found) < 2:  # checked before the store or S3 is touched: nothing is replaced
            errors.append(f"{split}/ has {len(found)} class folder{'s' * (len(found) != 1)}: a classifier needs "
                          f"at least 2, each holding images")
    if "train" in counts:
        classes = set(counts["train"])
        for split in counts:
            if split != "train" and set(counts[split]) != classes:
                missing = sorted(classes - set(counts[split]))[:5]
                extra = sorted(set(counts[split]) - classes)[:5]
                errors.append(f"{split}/ classes differ from train/: missing {missing}, extra {extra}")
        if strict:
            if sorted(classes) != DOG_CLASS_DIRS:
                errors.append(f"expected the {len(DOG_CLASS_DIRS)} dogImages classes (001.Affenpinscher .. "
                              f"133.Yorkshire_terrier), found {len(classes)}: missing "
                              f"{sorted(set(DOG_CLASS_DIRS) - classes)[:3]}, "
                              f"extra {sorted(classes - set(DOG_CLASS_DIRS))[:3]}")
            for split, expected in DOG_SPLIT_SIZES.items():
                got = sum(counts.get(split, {}).values())
                if split in counts and got != expected:
                    errors.append(f"{split}/ has {got} images, dogImages has {expected}")
    if errors:
        hint = ("" if not strict else
                " (for a dataset other than dogImages, verify with strict=False / data.strict: false)")
        raise DataError(f"dataset {root} is not valid{hint}:\n  - " + "\n  - ".join(errors))
    return counts


# ---------------------------------------------------------------- upload

def s3_etag(path: Path, part_size: int = S3_PART) -> str:
    """The ETag S3 gives `path` uploaded with this part size: md5, or md5-of-md5s + '-N' if multipart."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size < part_size:
            return f'"{hashlib.md5(f.read()).hexdigest()}"'
        digests = [hashlib.md5(block).digest() for block in iter(lambda: f.read(part_size), b"")]
    return f'"{hashlib.md5(b"".join(digests)).hexdigest()}-{len(digests)}"'


def upload_s3(root: Path, uri: str, s3, workers: int = 8, out: TextIO = sys.stdout) -> tuple[int, int]:
    """Upload the tree under `uri`; skip objects whose size and ETag already match. Returns (uploaded, skipped)."""
    from boto3.s3.transfer import TransferConfig

    bucket, prefix = split_s3_uri(uri)
    prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
    existing = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            existing[obj["Key"]] = (obj["Size"], obj["ETag"])
    files = sorted(p for p in Path(root).rglob("*") if p.is_file() and not p.name.startswith("."))
    todo = []
    for p in files:
        key = prefix + p.relative_to(root).as_posix()
        have = existing.pop(key, None)
        if have and have[0] == p.stat().st_size and have[1] == s3_etag(p):
            continue
        todo.append((p, key))
    config = TransferConfig(multipart_threshold=S3_PART, multipart_chunksize=S3_PART)
    bar = _Progress(f"uploading to {uri}", len(todo), unit="files", scale=1, out=out)
    with cf.ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(s3.upload_file, str(p), bucket, key, Config=config) for p, key in todo]
        for fut in cf.as_completed(futures):
            fut.result()
            bar.update(1)
    bar.close()
    if existing:  # not ours to delete without asking: they may be someone's data
        print(f"note: {len(existing)} objects under {uri} are not in {root} (left in place), "
              f"e.g. {next(iter(existing))}", file=out)
    print(f"uploaded {len(todo)} files to {uri}, {len(files) - len(todo)} unchanged", file=out)
    return len(todo), len(files) - len(todo)


# ---------------------------------------------------------------- the command

def prepare_dataset(data_uri: str, source: str | os.PathLike | None = None, url: str = DOGIMAGES_URL,
                    sha256: str | None = DOGIMAGES_SHA256, strict: bool = True, cache_dir: Path = DEFAULT_CACHE,
                    store=None, s3=None, out: TextIO = sys.stdout) -> str:
    """Get the dataset (download, `source` zip, or `source` folder), verify it, put it at `data_uri`.

    `store` (a LocalStore) receives it for local runs; otherwise `s3` (a boto3 client).
    """
    cache_dir = Path(cache_dir)
    if source is None:
        zip_path = download(url, cache_dir / Path(url.split("?")[0]).name, sha256=sha256, out=out)
    elif Path(source).is_file():
        zip_path = Path(source)
    elif Path(source).is_dir():
        zip_path = None
    else:
        raise DataError(f"--data {source}: no such file or folder")
    if zip_path is not None:
        folder = cache_dir / zip_path.stem
        marker = folder / ".extracted-from"
        stamp = f"{zip_path.resolve()} {zip_path.stat().st_size} {zip_path.stat().st_mtime_ns}"
        if not (marker.exists() and marker.read_text() == stamp):
            safe_extract(zip_path, folder, out=out)
            atomic_write(marker, stamp)
        source = folder
    root = find_root(Path(source))
    counts = verify_dataset(root, strict=strict)
    sizes = ", ".join(f"{s} {sum(c.values())}" for s, c in counts.items())
    print(f"verified {root}: {len(counts['train'])} classes; {sizes} images", file=out)
    if store is not None:
        store.put_dir(data_uri, root)
        print(f"copied into the local store at {store.path(data_uri)}", file=out)
    else:
        upload_s3(root, data_uri, s3, out=out)
    return data_uri


def prepare_data(cfg, source: str | None, store=None) -> str:
    """run_pipeline.py --prepare-data: returns the data URI the pipeline reads. `store` (a local
    object store, for --local) receives the data; else S3 does, after the account's pre-flight
    checks. Raises DataError for the data, AwsSetupError for the account (one line, exit 1)."""
    data = cfg.data
    kwargs = dict(url=data.url or DOGIMAGES_URL,
                  sha256=data.sha256 or DOGIMAGES_SHA256,
                  strict=data.strict,
                  cache_dir=Path(data.cache_dir or DEFAULT_CACHE))
    if store is not None:
        return prepare_dataset(data.uri, source, store=store, **kwargs)
    import boto3

    from pipeline.preflight import check_bucket, check_credentials, check_region
    # before the 1 GB download, not after
    session = boto3.Session(region_name=check_region(cfg.aws.region))
    check_credentials(session)
    check_bucket(session, split_s3_uri(data.uri)[0], cfg.aws.region)
    return prepare_dataset(data.uri, source, s3=session.client("s3"), **kwargs)
