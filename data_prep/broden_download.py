"""Download, check, unpack and verify the real Broden data set (broden1_224 / broden1_227).

The zip is fetched into ``<out>/broden1_<size>.zip.part`` with HTTP Range
requests, so an interrupted download resumes where it stopped; it becomes
``broden1_<size>.zip`` only after its size matches the server's and
``zipfile.testzip`` finds no corrupt member. It is then unpacked into
``<out>/broden1_<size>`` (via a temporary directory renamed at the end) and
checked with ``verify_broden.verify``. Nothing is retried: each failure raises
``DownloadError`` with one sentence that says what to do.
"""

from __future__ import annotations

import http.client
import shutil
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

from data_prep.verify_broden import verify

BASE_URL = "http://netdissect.csail.mit.edu/data/"
SIZES = (224, 227)
CHUNK_BYTES = 1 << 20


class DownloadError(RuntimeError):
    """The download, check or unpacking failed; the message says what to do."""


def zip_name(size: int) -> str:
    """File name of the Broden zip for images of ``size`` pixels."""
    if size not in SIZES:
        raise ValueError(f"Broden is published at sizes {SIZES}, not {size}")
    return f"broden1_{size}.zip"


def total_size(response, start: int) -> int | None:
    """Full file size implied by a response to a request for bytes ``start``- (None when the server does not say)."""
    content_range = response.headers.get("Content-Range")
    if content_range and "/" in content_range and content_range.rsplit("/", 1)[1].strip().isdigit():
        return int(content_range.rsplit("/", 1)[1])
    length = response.headers.get("Content-Length")
    if length is None:
        return None
    return start + int(length) if response.status == 206 else int(length)


def fetch(url: str, part: Path, timeout: float) -> int:
    """Download ``url`` into ``part``, resuming from the bytes already there; return the full size in bytes.

    Raises DownloadError when the server cannot be reached, the transfer stops, or the size is wrong.
    """
    start = part.stat().st_size if part.exists() else 0
    host = urllib.parse.urlsplit(url).netloc
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and start:
            raise DownloadError(
                f"{host} refused to resume {url} at byte {start}; delete {part} and run the same command again"
            ) from error
        raise DownloadError(f"{host} answered {error.code} {error.reason} for {url}; check the address") from error
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise DownloadError(
            f"could not reach {host} ({reason}); download {url.rsplit('/', 1)[-1]} on a connected machine "
            f"and unpack it into {part.parent}, or use the generated data set: python -m data_prep synthetic"
        ) from error
    with response:
        if response.status != 206:
            start = 0
        expected = total_size(response, start)
        try:
            with part.open("ab" if start else "wb") as file:
                while chunk := response.read(CHUNK_BYTES):
                    file.write(chunk)
        except (OSError, http.client.HTTPException) as error:
            raise DownloadError(
                f"the download of {url} stopped at byte {part.stat().st_size} ({error}); "
                f"run the same command again to resume"
            ) from error
    received = part.stat().st_size
    if expected is not None and received != expected:
        raise DownloadError(
            f"the download of {url} stopped at byte {received} of {expected}; run the same command again to resume"
        )
    return received


def check_zip(path: Path) -> None:
    """Raise DownloadError if ``path`` is not a zip file whose members all pass their CRC check."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError) as error:
        raise DownloadError(f"{path} is not a valid zip file ({error}); delete it and run the command again") from error
    if bad is not None:
        raise DownloadError(f"{path} has a corrupt member {bad}; delete it and run the command again")


def unpack(archive_path: Path, target: Path) -> None:
    """Unpack the Broden zip into ``target`` (the zip holds one top-level directory named like ``target``)."""
    staging = target.parent / f"{target.name}.unpacking"
    if staging.exists():
        shutil.rmtree(staging)
    with zipfile.ZipFile(archive_path) as archive:
        archive.extractall(staging)
    inner = staging / target.name
    if not (inner / "index.csv").is_file():
        raise DownloadError(f"{archive_path} does not contain {target.name}/index.csv; it is not a Broden zip")
    inner.rename(target)
    shutil.rmtree(staging)


def download(size: int, out: Path, base_url: str = BASE_URL, timeout: float = 20.0) -> Path:
    """Make ``<out>/broden1_<size>`` hold the verified Broden data set and return that path.

    Skips the steps already done: an unpacked directory with index.csv is returned as is,
    a complete zip is not downloaded again, a partial one is resumed.
    """
    name = zip_name(size)
    out = Path(out)
    target = out / name.removesuffix(".zip")
    if (target / "index.csv").is_file():
        return target
    out.mkdir(parents=True, exist_ok=True)
    archive_path = out / name
    if not archive_path.exists():
        part = out / f"{name}.part"
        fetch(urllib.parse.urljoin(base_url, name), part, timeout)
        check_zip(part)
        part.rename(archive_path)
    unpack(archive_path, target)
    problems = verify(target)
    if problems:
        raise DownloadError(
            f"{target} was unpacked but has {len(problems)} problems (first: {problems[0]}); "
            f"run python -m data_prep verify {target} for the full list"
        )
    return target
