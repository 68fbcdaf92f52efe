"""Headless Chromium for report tests: the DOM after scripts ran, console messages, a screenshot."""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-logging=stderr", "--v=0"]


def chromium() -> str:
    """Path of Debian's chromium; skips the test where it is missing, except in CI (.ci/run installs it)."""
    path = shutil.which("chromium")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs it with apt-get")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return path


def open_page(page: Path, screenshot: Path | None = None) -> tuple[str, str]:
    """(DOM after scripts, stderr with console messages) of a page opened from the file system."""
    with tempfile.TemporaryDirectory() as profile:
        command = [chromium(), *FLAGS, f"--user-data-dir={profile}", "--window-size=1280,1600",
                   "--virtual-time-budget=3000"]
        dom = subprocess.run([*command, "--dump-dom", page.resolve().as_uri()], capture_output=True, text=True,
                             timeout=120, check=True)
        if screenshot is not None:
            subprocess.run([*command, f"--screenshot={screenshot}", page.resolve().as_uri()], capture_output=True,
                           timeout=120, check=True)
    return dom.stdout, dom.stderr


def console_errors(stderr: str) -> list[str]:
    """Console messages of the page that are errors (uncaught exceptions, failed loads)."""
    return [line for line in stderr.splitlines() if "CONSOLE" in line and ("Uncaught" in line or "rror" in line)]
