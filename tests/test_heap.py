"""dissect.heap: freed memory stays in a thread's glibc heap while retained, and goes back to the system after.

Each case runs in a fresh interpreter: glibc's malloc settings are process-wide
and the dynamic ones cannot be put back, so they must not leak into other tests.
A thread (not the main one, as the extract stage's forward pass) mallocs three
16 MiB blocks, writes every page, frees them, and does it again: a forward
pass's outputs in miniature; then six at once, more than one heap holds. The
counts are glibc's rules worked by hand: by default a block of a size that was freed mmapped before (16 MiB here, the
dynamic mmap threshold after the first round) is mmapped again, so every round
faults in all 3 x 4,096 pages; retained, the blocks come from the thread's
64 MiB heap, which is kept, so rounds after the first fault in almost nothing.
"""

import json
import subprocess
import sys
import textwrap

import pytest

from dissect.heap import glibc

pytestmark = pytest.mark.skipif(glibc() is None, reason="dissect.heap changes glibc's malloc only")

BLOCK = 16 * 2**20
PAGES_PER_ROUND = 3 * BLOCK // 4096

SCRIPT = textwrap.dedent("""
    import ctypes, json, resource, sys, threading
    from contextlib import nullcontext
    from dissect.heap import retained_heap

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    BLOCK, ROUNDS, MODE = {block}, 8, sys.argv[1]

    def rss_mib():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

    def one_round(n_blocks):
        blocks = [libc.malloc(BLOCK) for _ in range(n_blocks)]
        for block in blocks:
            ctypes.memset(block, 1, BLOCK)
        for block in blocks:
            libc.free(block)

    def faults():
        return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt

    result = {{}}
    def work():  # in a thread, which enters and leaves the settings itself, as the stage's forward thread does
        baseline = rss_mib()
        with retained_heap() if MODE != "default" else nullcontext():
            with retained_heap() if MODE == "nested" else nullcontext():
                one_round(3)  # the first round faults its pages in whatever the settings
                before = faults()
                for _ in range(ROUNDS - 1):
                    one_round(3)
                result["faults_per_round"] = (faults() - before) / (ROUNDS - 1)
            one_round(6)  # 96 MiB: more than one 64 MiB heap
            result["kept_inside_mib"] = rss_mib() - baseline
        one_round(1)  # a later free in this thread's arena, with the settings put back
        result["kept_after_mib"] = rss_mib() - baseline

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    print(json.dumps(result))
""").format(block=BLOCK)


def run_case(mode: str) -> dict:
    """Run SCRIPT in a fresh interpreter with ``mode`` (default, retained, nested); its measurements."""
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_default_glibc_faults_every_round_in_again():
    """The control: without the settings every round maps and faults in its three blocks anew."""
    result = run_case("default")
    assert result["faults_per_round"] >= 0.95 * PAGES_PER_ROUND


def test_retained_heap_reuses_the_freed_blocks_and_lets_them_go_after():
    """Inside, the rounds reuse their blocks and freed heaps stay resident; after, at most one heap stays.

    One 64 MiB heap per thread is what glibc itself keeps at the trim
    threshold it reaches once a 32 MiB block is freed (``dissect.heap``).
    """
    result = run_case("retained")
    assert result["faults_per_round"] <= 0.02 * PAGES_PER_ROUND
    assert result["kept_inside_mib"] >= 0.9 * 6 * BLOCK / 2**20
    assert result["kept_after_mib"] <= 64 + 4


def test_an_inner_holder_leaving_keeps_the_settings_of_the_outer_one():
    result = run_case("nested")
    assert result["faults_per_round"] <= 0.02 * PAGES_PER_ROUND
    assert result["kept_inside_mib"] >= 0.9 * 6 * BLOCK / 2**20  # the inner holder's exit put nothing back
    assert result["kept_after_mib"] <= 64 + 4
