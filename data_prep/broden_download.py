"""Download (or take a local copy of), check, unpack and verify the real Broden data set (broden1_224 / broden1_227).

The zip is fetched into ``<out>/broden1_<size>.zip.part`` from the mirrors in
order (``MIRRORS`` by default, the authors' site first). A mirror that refuses
the connection or answers with an HTTP error is logged in one line and the next
one is tried; a mirror that drops the connection mid-file is asked again for the
rest with an HTTP Range request, as long as each try brings new bytes
(``RESUMES_PER_MIRROR`` at most), then the next mirror resumes from the same
``.part`` file. A partial download is never deleted, so the next run resumes it.

The complete file is checked against what ``KNOWN_ZIPS`` records for it (size,
SHA-256 or MD5; the authors publish neither, so most entries are empty and the
log says so), then with ``zipfile.testzip``; only then does it become
``broden1_<size>.zip``. It is unpacked into ``<out>/broden1_<size>`` (via a
temporary directory renamed at the end) and checked with ``verify_broden.verify``.
``install_zip`` does the same checks, unpacking and verification for a zip the
user got elsewhere. Each failure raises ``DownloadError`` (``Unreachable`` when
no mirror could deliver the file) with one sentence that says what to do.
"""

from __future__ import annotations

import hashlib
import http.client
import shutil
import sys
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from data_prep.verify_broden import verify

SIZES = (224, 227)
CHUNK_BYTES = 1 << 20
RESUMES_PER_MIRROR = 5  # Range requests to one mirror after it dropped the connection, each must bring new bytes

# Directories holding broden1_224.zip and broden1_227.zip, tried in this order
# (``--mirror`` replaces the list).
MIRRORS: tuple[str, ...] = (
    # The authors' site (NetDissect's script/dlbroden.sh downloads from here).
    "http://netdissect.csail.mit.edu/data/",
    # The Wayback Machine's copy of that directory; the "id_" suffix serves the
    # original bytes. The capture time is the one of broden1_227.zip cited by
    # github.com/Aer-3888/tiny_netdissect's README; for broden1_224.zip the
    # archive redirects to its nearest capture, if it holds one.
    "https://web.archive.org/web/20240418040425id_/http://netdissect.csail.mit.edu/data/",
)


@dataclass(frozen=True)
class KnownZip:
    """What is known about one published Broden zip; None where nothing is known."""

    size: int | None = None  # bytes
    sha256: str | None = None
    md5: str | None = None  # only where no SHA-256 is known
    source: str = ""  # where the values above come from


# The one place for sizes and checksums of the Broden zips: add a value here,
# with where it comes from, when one becomes known. The authors publish no size
# or checksum for either zip (their download script only runs wget).
KNOWN_ZIPS: dict[str, KnownZip] = {
    "broden1_224.zip": KnownZip(
        md5="be13c292eaef3300da03f8d0e48eab1c",
        source="the MD5 that scripts/init.sh of github.com/rmassidda/bisturi (commit 55683c4) "
        "checks after downloading the zip from the authors' site",
    ),
    "broden1_227.zip": KnownZip(),
}


class DownloadError(RuntimeError):
    """The download, check or unpacking failed; the message says what to do."""


class Unreachable(DownloadError):
    """No mirror delivered the zip (offline, refused, HTTP errors or dropped connections)."""


class MirrorFailed(Exception):
    """One request to one mirror failed; ``dropped`` is True when the transfer stopped after it began."""

    def __init__(self, reason: str, dropped: bool = False) -> None:
        super().__init__(reason)
        self.dropped = dropped


def log_to_stderr(line: str) -> None:
    """Default log: one line on standard error."""
    print(line, file=sys.stderr)


def zip_name(size: int) -> str:
    """File name of the Broden zip for images of ``size`` pixels."""
    if size not in SIZES:
        raise ValueError(f"Broden is published at sizes {SIZES}, not {size}")
    return f"broden1_{size}.zip"


def file_url(mirror: str, name: str) -> str:
    """URL of ``name`` on ``mirror`` (a directory URL, or a URL that already ends with ``.zip``)."""
    if mirror.endswith(".zip"):
        return mirror
    return mirror if mirror.endswith("/" + name) else mirror.rstrip("/") + "/" + name


def total_size(response: http.client.HTTPResponse, start: int) -> int | None:
    """Full file size implied by a response to a request for bytes ``start``- (None when the server does not say)."""
    content_range = response.headers.get("Content-Range")
    if content_range and "/" in content_range and content_range.rsplit("/", 1)[1].strip().isdigit():
        return int(content_range.rsplit("/", 1)[1])
    length = response.headers.get("Content-Length")
    if length is None:
        return None
    return start + int(length) if response.status == 206 else int(length)


def fetch(url: str, part: Path, timeout: float, expected_size: int | None = None) -> int:
    """Download ``url`` into ``part``, resuming from the bytes already there; return the full size in bytes.

    Raises MirrorFailed when the server cannot be reached, answers with an HTTP
    error, serves a file of another size than ``expected_size``, or stops the transfer.
    """
    start = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        content_range = error.headers.get("Content-Range", "") if error.headers else ""
        if error.code == 416 and start and content_range.endswith(f"/{start}"):
            return start  # the part file is already complete
        raise MirrorFailed(f"HTTP {error.code} {error.reason}") from error
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        raise MirrorFailed(f"cannot connect: {getattr(error, 'reason', error)}") from error
    with response:
        if response.status != 206:
            start = 0
        expected = total_size(response, start)
        if expected is not None and expected_size is not None and expected != expected_size:
            raise MirrorFailed(f"it serves {expected} bytes, not the known size {expected_size}")
        try:
            with part.open("ab" if start else "wb") as file:
                while chunk := response.read(CHUNK_BYTES):
                    file.write(chunk)
        except (OSError, http.client.HTTPException) as error:
            received = part.stat().st_size
            raise MirrorFailed(f"connection dropped at byte {received} of {expected} ({error!r})", True) from error
    received = part.stat().st_size
    if expected is not None and received != expected:
        raise MirrorFailed(f"connection dropped at byte {received} of {expected}", True)
    return received


def fetch_from_mirrors(
    size: int, mirrors: Sequence[str], part: Path, timeout: float, log: Callable[[str], None]
) -> None:
    """Complete ``part`` from the first mirror that delivers the zip of ``size``; log one line per failed try.

    Raises Unreachable (the part file is kept) when every mirror failed.
    """
    name = zip_name(size)
    known_size = KNOWN_ZIPS.get(name, KnownZip()).size
    for mirror in mirrors:
        url = file_url(mirror, name)
        for _ in range(RESUMES_PER_MIRROR + 1):
            before = part.stat().st_size if part.exists() else 0
            try:
                fetch(url, part, timeout, known_size)
                return
            except MirrorFailed as error:
                now = part.stat().st_size if part.exists() else 0
                if error.dropped and now > before:
                    log(f"mirror {url} failed: {error}; asking it for the rest with a Range request")
                    continue
                log(f"mirror {url} failed: {error}; trying the next mirror")
                break
    kept = part.stat().st_size if part.exists() else 0
    keep_note = f" ({kept} bytes are kept in {part} for the next try)" if kept else ""
    raise Unreachable(
        f"no mirror delivered {name}{keep_note}; run the same command again when online or with another "
        f"--mirror URL, or download {name} on a connected machine and run python -m data_prep download "
        f"--size {size} --out {part.parent} --from-zip PATH, or use the generated data set instead: "
        f"python -m data_prep synthetic"
    )


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of the file at ``path`` with hashlib's ``algorithm``."""
    digest = hashlib.new(algorithm)
    with path.open("rb") as file:
        while chunk := file.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def check_archive(path: Path, name: str, remedy: str, log: Callable[[str], None]) -> None:
    """Raise DownloadError (ending with ``remedy``) unless ``path`` matches ``KNOWN_ZIPS[name]`` and is a sound zip.

    Checks the known size, then the SHA-256 (or, where only that is known, the
    MD5), then every member's CRC; logs one line saying what was checked.
    """
    known = KNOWN_ZIPS.get(name, KnownZip())
    if known.size is not None and path.stat().st_size != known.size:
        raise DownloadError(
            f"{path} is {path.stat().st_size} bytes, but {name} is {known.size} bytes (from {known.source}); {remedy}"
        )
    algorithm, label, expected = ("sha256", "SHA-256", known.sha256) if known.sha256 else ("md5", "MD5", known.md5)
    if expected is not None:
        actual = file_digest(path, algorithm)
        if actual != expected.lower():
            raise DownloadError(
                f"{path} has {label} {actual}, but {name} has {expected} (from {known.source}); {remedy}"
            )
    check_zip(path, remedy)
    if algorithm == "sha256" and expected is not None:
        log(f"{path} matches the known SHA-256 of {name} and is a sound zip")
    elif expected is not None:
        log(f"no published SHA-256 for {name}; checked its known MD5 and zip integrity")
    else:
        log(f"no published SHA-256 for {name}; checked zip integrity only")


def check_zip(path: Path, remedy: str) -> None:
    """Raise DownloadError (ending with ``remedy``) if ``path`` is not a zip file whose members all pass their CRC check."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError) as error:
        raise DownloadError(f"{path} is not a valid zip file ({error}); {remedy}") from error
    if bad is not None:
        raise DownloadError(f"{path} has a corrupt member {bad}; {remedy}")


def unpack(archive_path: Path, target: Path) -> None:
    """Unpack the Broden zip into ``target`` (the zip holds one top-level directory named like ``target``)."""
    staging = target.parent / f"{target.name}.unpacking"
    if staging.exists():
        shutil.rmtree(staging)
    with zipfile.ZipFile(archive_path) as archive:
        archive.extractall(staging)
    inner = staging / target.name
    if not (inner / "index.csv").is_file():
        shutil.rmtree(staging)
        raise DownloadError(
            f"{archive_path} does not contain {target.name}/index.csv, so it is not {target.name}.zip "
            f"(pass the --size of the zip you have)"
        )
    inner.rename(target)
    shutil.rmtree(staging)


def unpack_and_verify(archive_path: Path, target: Path) -> Path:
    """Unpack ``archive_path`` into ``target``, run ``verify`` on it and return ``target``."""
    unpack(archive_path, target)
    problems = verify(target)
    if problems:
        raise DownloadError(
            f"{target} was unpacked but has {len(problems)} problems (first: {problems[0]}); "
            f"run python -m data_prep verify {target} for the full list"
        )
    return target


def download(
    size: int,
    out: Path,
    mirrors: Sequence[str] = MIRRORS,
    timeout: float = 20.0,
    log: Callable[[str], None] = log_to_stderr,
) -> Path:
    """Make ``<out>/broden1_<size>`` hold the verified Broden data set downloaded from ``mirrors``; return that path.

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
        fetch_from_mirrors(size, mirrors, part, timeout, log)
        remedy = f"delete {part} and run the same command again"
        check_archive(part, name, remedy, log)
        part.rename(archive_path)
    return unpack_and_verify(archive_path, target)


def install_zip(size: int, archive_path: Path, out: Path, log: Callable[[str], None] = log_to_stderr) -> Path:
    """Check ``archive_path`` (a Broden zip got elsewhere) like a download, unpack it into ``<out>/broden1_<size>``, verify it; return that path."""
    name = zip_name(size)
    archive_path = Path(archive_path)
    target = Path(out) / name.removesuffix(".zip")
    if (target / "index.csv").is_file():
        return target
    if not archive_path.is_file():
        raise DownloadError(f"{archive_path} is not a file; pass the path of {name} to --from-zip")
    remedy = f"get another copy of {name} and run the same command again"
    check_archive(archive_path, name, remedy, log)
    target.parent.mkdir(parents=True, exist_ok=True)
    return unpack_and_verify(archive_path, target)
