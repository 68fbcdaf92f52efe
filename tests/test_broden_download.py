"""Broden download: mirrors in order, resume with HTTP Range, size/checksum and zip checks, --from-zip, offline sentence.

Every server is bound to 127.0.0.1; the refusing mirror is a socket bound there that never listens.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import socket
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from data_prep import broden_download
from data_prep.__main__ import main
from data_prep.broden_download import DownloadError, KnownZip, Unreachable, download, install_zip
from data_prep.synthetic_broden import generate
from dissect.broden import BrodenDataset

NAME = "broden1_224.zip"
REAL_KNOWN_ZIPS = dict(broden_download.KNOWN_ZIPS)  # before the autouse fixture replaces it
OFFLINE_ADVICE = (
    "run the same command again when online or with another --mirror URL, or download broden1_224.zip on a "
    "connected machine and run python -m data_prep download --size 224 --out {out} --from-zip PATH, "
    "or use the generated data set instead: python -m data_prep synthetic"
)


class ZipServer(http.server.ThreadingHTTPServer):
    """Serves ``payload`` at /broden1_224.zip with Range support; can cut one response short and drop the connection."""

    daemon_threads = False  # server_close joins every request thread
    payload = b""
    cut_after: int | None = None
    ranges: list[str | None]


class RangeHandler(http.server.BaseHTTPRequestHandler):
    server: ZipServer

    def do_GET(self) -> None:
        if self.path != f"/{NAME}":
            self.send_error(404)
            return
        payload = self.server.payload
        header = self.headers.get("Range")
        self.server.ranges.append(header)
        start = int(header.removeprefix("bytes=").removesuffix("-")) if header else 0
        body = payload[start:]
        self.send_response(206 if header else 200)
        if header:
            self.send_header("Content-Range", f"bytes {start}-{len(payload) - 1}/{len(payload)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.server.cut_after is not None:
            body, self.server.cut_after = body[: self.server.cut_after], None
        self.wfile.write(body)  # HTTP/1.0: the connection closes after this, mid-file when cut

    def log_message(self, *args: object) -> None:
        pass


def broden_zip(tmp_path: Path) -> bytes:
    """A zip holding a tiny generated Broden set under broden1_224/."""
    root = generate(tmp_path / "src" / "broden1_224", n_images=5, size=32, seed=0, workers=1)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(root.rglob("*")):
            archive.write(path, path.relative_to(root.parent))
    return buffer.getvalue()


def corrupt(payload: bytes) -> bytes:
    """``payload`` with one byte of the stored index.csv member flipped (its CRC no longer matches)."""
    changed = bytearray(payload)
    changed[changed.index(b"image,split,ih,iw")] ^= 0xFF
    return bytes(changed)


@pytest.fixture(autouse=True)
def nothing_known(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real table's entries do not describe the test zips: start every test with nothing known."""
    monkeypatch.setattr(broden_download, "KNOWN_ZIPS", {name: KnownZip() for name in broden_download.KNOWN_ZIPS})


def know(monkeypatch: pytest.MonkeyPatch, payload: bytes) -> str:
    """Record the size and SHA-256 of ``payload`` (computed here) as known for broden1_224.zip; return the SHA-256."""
    sha256 = hashlib.sha256(payload).hexdigest()
    monkeypatch.setitem(broden_download.KNOWN_ZIPS, NAME, KnownZip(size=len(payload), sha256=sha256, source="the test"))
    return sha256


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ZipServer]:
    zip_server = ZipServer(("127.0.0.1", 0), RangeHandler)
    zip_server.payload = broden_zip(tmp_path)
    zip_server.ranges = []
    thread = threading.Thread(target=zip_server.serve_forever)
    thread.start()
    yield zip_server
    zip_server.shutdown()
    zip_server.server_close()
    thread.join()


@pytest.fixture
def refused() -> Iterator[str]:
    """URL of a mirror on 127.0.0.1 that refuses the connection (a bound port nobody listens on)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/"


def url(server: ZipServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/"


def log_lines(err: str) -> list[str]:
    """The lines of ``err`` without verify's progress bar."""
    return [line for line in err.splitlines() if line and not line.startswith("verifying ")]


def test_known_table_covers_both_zips_and_cites_a_source_for_every_value() -> None:
    assert set(REAL_KNOWN_ZIPS) == {f"broden1_{size}.zip" for size in (224, 227)}
    for known in REAL_KNOWN_ZIPS.values():
        values = (known.size, known.sha256, known.md5)
        assert (known.source != "") == any(value is not None for value in values)
        for digest, length in ((known.sha256, 64), (known.md5, 32)):
            assert digest is None or (len(digest) == length and set(digest) <= set("0123456789abcdef"))


def test_refused_then_http_error_then_dropped_mirror_resumes_with_range(
    tmp_path: Path, server: ZipServer, refused: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "data"
    size = len(server.payload)
    half = size // 2
    know(monkeypatch, server.payload)
    server.cut_after = half
    missing = f"{url(server)}missing/"

    code = main(["download", "--out", str(out), "--mirror", refused, "--mirror", missing, "--mirror", url(server)])

    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = log_lines(captured.err)
    assert len(lines) == 4, lines
    assert lines[0].startswith(f"mirror {refused}{NAME} failed: cannot connect: ")
    assert "refused" in lines[0].lower() and lines[0].endswith("; trying the next mirror")
    assert lines[1] == f"mirror {missing}{NAME} failed: HTTP 404 Not Found; trying the next mirror"
    assert lines[2].startswith(f"mirror {url(server)}{NAME} failed: connection dropped at byte {half} of {size}")
    assert lines[2].endswith("; asking it for the rest with a Range request")
    assert lines[3] == f"{out / f'{NAME}.part'} matches the known SHA-256 of {NAME} and is a sound zip"
    assert server.ranges == [None, f"bytes={half}-"]
    assert (out / NAME).read_bytes() == server.payload
    assert not (out / f"{NAME}.part").exists()
    assert captured.out == f"ok: {out / 'broden1_224'}\n"
    assert BrodenDataset(out / "broden1_224").image_ids == [f"{i:06d}.jpg" for i in range(5)]
    assert download(224, out, mirrors=[refused], timeout=1) == out / "broden1_224"  # done: no network needed


def test_offline_every_path_fails_with_one_sentence_and_keeps_the_part(
    tmp_path: Path, server: ZipServer, refused: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "data"
    with pytest.raises(Unreachable) as caught:
        download(224, out, mirrors=[refused], timeout=2, log=lambda line: None)
    assert str(caught.value) == f"no mirror delivered {NAME}; " + OFFLINE_ADVICE.format(out=out)

    part = out / f"{NAME}.part"
    part.write_bytes(server.payload[:1000])
    code = main(["download", "--out", str(out), "--mirror", refused])
    err = log_lines(capsys.readouterr().err)
    assert code == 2
    assert err[-1] == f"error: no mirror delivered {NAME} (1000 bytes are kept in {part} for the next try); " + (
        OFFLINE_ADVICE.format(out=out)
    )
    assert ". " not in err[-1]
    assert part.read_bytes() == server.payload[:1000]  # nothing already downloaded is lost

    download(224, out, mirrors=[refused, url(server)], timeout=5, log=lambda line: None)  # back online: resumes
    assert server.ranges == ["bytes=1000-"]
    assert (out / NAME).read_bytes() == server.payload


def test_wrong_checksum_is_refused(tmp_path: Path, server: ZipServer, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "data"
    expected = know(monkeypatch, corrupt(server.payload))  # same size, other bytes
    part = out / f"{NAME}.part"
    with pytest.raises(DownloadError) as caught:
        download(224, out, mirrors=[url(server)], timeout=5)
    assert str(caught.value) == (
        f"{part} has SHA-256 {hashlib.sha256(server.payload).hexdigest()}, but {NAME} has {expected} "
        f"(from the test); delete {part} and run the same command again"
    )
    assert part.read_bytes() == server.payload
    assert not (out / NAME).exists() and not (out / "broden1_224").exists()


def test_corrupt_member_is_refused(tmp_path: Path, server: ZipServer) -> None:
    server.payload = corrupt(server.payload)
    part = tmp_path / "data" / f"{NAME}.part"
    with pytest.raises(DownloadError) as caught:
        download(224, tmp_path / "data", mirrors=[url(server)], timeout=5)
    assert str(caught.value) == (
        f"{part} has a corrupt member broden1_224/index.csv; delete {part} and run the same command again"
    )


def test_truncated_archive_is_refused(tmp_path: Path, server: ZipServer) -> None:
    server.payload = server.payload[: len(server.payload) - 100]  # served in full: only the zip check can tell
    part = tmp_path / "data" / f"{NAME}.part"
    with pytest.raises(DownloadError) as caught:
        download(224, tmp_path / "data", mirrors=[url(server)], timeout=5)
    message = str(caught.value)
    assert message.startswith(f"{part} is not a valid zip file (")
    assert message.endswith(f"); delete {part} and run the same command again")


def test_mirror_serving_another_size_is_skipped(
    tmp_path: Path, server: ZipServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    known = len(server.payload) + 1
    monkeypatch.setitem(broden_download.KNOWN_ZIPS, NAME, KnownZip(size=known, source="the test"))
    lines: list[str] = []
    with pytest.raises(Unreachable):
        download(224, tmp_path / "data", mirrors=[url(server)], timeout=5, log=lines.append)
    assert lines == [
        f"mirror {url(server)}{NAME} failed: it serves {len(server.payload)} bytes, not the known size {known}; "
        f"trying the next mirror"
    ]
    assert not (tmp_path / "data" / f"{NAME}.part").exists()


def test_from_zip_good(
    tmp_path: Path, server: ZipServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    archive = tmp_path / "elsewhere" / "my_copy.zip"
    archive.parent.mkdir()
    archive.write_bytes(server.payload)
    know(monkeypatch, server.payload)
    out = tmp_path / "data"

    assert main(["download", "--out", str(out), "--from-zip", str(archive)]) == 0

    captured = capsys.readouterr()
    assert log_lines(captured.err) == [f"{archive} matches the known SHA-256 of {NAME} and is a sound zip"]
    assert captured.out == f"ok: {out / 'broden1_224'}\n"
    assert BrodenDataset(out / "broden1_224").image_ids == [f"{i:06d}.jpg" for i in range(5)]
    assert archive.read_bytes() == server.payload
    assert server.ranges == []


def test_from_zip_without_known_checksum_says_so(tmp_path: Path, server: ZipServer) -> None:
    archive = tmp_path / NAME
    archive.write_bytes(server.payload)
    lines: list[str] = []
    root = install_zip(224, archive, tmp_path / "data", log=lines.append)
    assert lines == [f"no published SHA-256 for {NAME}; checked zip integrity only"]
    assert BrodenDataset(root).image_ids == [f"{i:06d}.jpg" for i in range(5)]


def test_from_zip_corrupt(
    tmp_path: Path, server: ZipServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    archive = tmp_path / NAME
    archive.write_bytes(corrupt(server.payload))
    out = tmp_path / "data"
    remedy = f"get another copy of {NAME} and run the same command again"

    assert main(["download", "--out", str(out), "--from-zip", str(archive)]) == 2
    assert capsys.readouterr().err == f"error: {archive} has a corrupt member broden1_224/index.csv; {remedy}\n"

    expected = know(monkeypatch, server.payload)
    assert main(["download", "--out", str(out), "--from-zip", str(archive)]) == 2
    assert capsys.readouterr().err == (
        f"error: {archive} has SHA-256 {hashlib.sha256(archive.read_bytes()).hexdigest()}, but {NAME} has {expected} "
        f"(from the test); {remedy}\n"
    )
    assert not (out / "broden1_224").exists()
    assert archive.read_bytes() == corrupt(server.payload)
