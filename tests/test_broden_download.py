"""Broden download: offline message, resume with HTTP Range, zip check, unpack and verify (local server only)."""

from __future__ import annotations

import http.server
import io
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from data_prep.broden_download import DownloadError, download
from data_prep.synthetic_broden import generate
from dissect.broden import BrodenDataset


class ZipServer(http.server.ThreadingHTTPServer):
    """Serves ``payload`` at /broden1_224.zip with Range support; can cut a response short once."""

    payload = b""
    cut_after: int | None = None
    ranges: list[str | None]


class RangeHandler(http.server.BaseHTTPRequestHandler):
    server: ZipServer

    def do_GET(self) -> None:
        if self.path != "/broden1_224.zip":
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
        self.wfile.write(body)

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


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ZipServer]:
    zip_server = ZipServer(("127.0.0.1", 0), RangeHandler)
    zip_server.payload = broden_zip(tmp_path)
    zip_server.ranges = []
    thread = threading.Thread(target=zip_server.serve_forever, daemon=True)
    thread.start()
    yield zip_server
    zip_server.shutdown()
    zip_server.server_close()


def url(server: ZipServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/"


def test_offline_gives_one_sentence_saying_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(DownloadError) as caught:
        download(224, tmp_path / "data", base_url="http://127.0.0.1:9/", timeout=2)
    message = str(caught.value)
    assert message.startswith("could not reach 127.0.0.1:9 (")
    assert f"download broden1_224.zip on a connected machine and unpack it into {tmp_path / 'data'}" in message
    assert message.endswith("or use the generated data set: python -m data_prep synthetic")
    assert "\n" not in message and ". " not in message


def test_interrupted_download_resumes_with_range(tmp_path: Path, server: ZipServer) -> None:
    out = tmp_path / "data"
    size = len(server.payload)
    server.cut_after = size // 3
    with pytest.raises(DownloadError, match=rf"stopped at byte {size // 3} of {size}; run the same command again"):
        download(224, out, base_url=url(server), timeout=5)
    assert (out / "broden1_224.zip.part").stat().st_size == size // 3

    root = download(224, out, base_url=url(server), timeout=5)

    assert server.ranges == [None, f"bytes={size // 3}-"]
    assert (out / "broden1_224.zip").read_bytes() == server.payload
    assert not (out / "broden1_224.zip.part").exists()
    assert root == out / "broden1_224"
    assert BrodenDataset(root).image_ids == [f"{i:06d}.jpg" for i in range(5)]
    assert download(224, out, base_url="http://127.0.0.1:9/", timeout=1) == root  # done: no network needed


def test_part_file_from_earlier_run_is_completed(tmp_path: Path, server: ZipServer) -> None:
    out = tmp_path / "data"
    out.mkdir()
    (out / "broden1_224.zip.part").write_bytes(server.payload[:1000])
    download(224, out, base_url=url(server), timeout=5)
    assert server.ranges == ["bytes=1000-"]
    assert (out / "broden1_224.zip").read_bytes() == server.payload


def test_corrupt_zip_is_reported(tmp_path: Path, server: ZipServer) -> None:
    payload = bytearray(server.payload)
    index_data = payload.index(b"image,split,ih,iw")  # inside the stored index.csv member
    payload[index_data] ^= 0xFF
    server.payload = bytes(payload)
    with pytest.raises(DownloadError, match=r"broden1_224\.zip\.part has a corrupt member broden1_224/index\.csv"):
        download(224, tmp_path / "data", base_url=url(server), timeout=5)
