"""Benchmark of the embed stage's projections: PCA to 50, t-SNE and UMAP at 10k and 50k points.

Usage: ``python benchmarks/embed.py [--sizes 10000 50000] [--dim 4096] [--timeout 600]``

Features are random but structured like a network's penultimate layer: a
mixture of 20 Gaussians in a 32-d subspace of the ``--dim``-d space plus
isotropic noise, float32. First, a fresh process measures umap-learn's import
and its first-call (numba compile) cost on a tiny input, for the exact
nearest-neighbour path (N < 4096) and the NN-descent path. Then each
(size, method) runs in a fresh process, UMAP compiled beforehand on a tiny
input so that its time excludes compilation, timing the PCA step and the
layout apart; a run that exceeds ``--timeout`` seconds is stopped and reported.
The script prints numbers; it asserts nothing. The machine's load average is
printed with them, since other work on the same cores slows OpenMP (t-SNE) a lot.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CLUSTERS = 20
SUBSPACE = 32
PCA_COMPONENTS = 50


def mixture_features(n_points: int, dim: int, seed: int = 0) -> np.ndarray:
    """(n_points, dim) float32: CLUSTERS Gaussian clusters in a random SUBSPACE-d subspace, plus noise."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((dim, SUBSPACE)))[0].astype(np.float32)
    centres = rng.standard_normal((CLUSTERS, SUBSPACE)) * 4
    latent = centres[rng.integers(0, CLUSTERS, n_points)] + rng.standard_normal((n_points, SUBSPACE))
    features = latent.astype(np.float32) @ basis.T
    features += 0.05 * rng.standard_normal((n_points, dim), dtype=np.float32)
    return features


def compile_probe() -> None:
    """In a fresh process: umap-learn's import time and first-call cost on 200 points, as JSON."""
    started = time.perf_counter()
    import umap

    timings = {"import_s": time.perf_counter() - started}
    data = mixture_features(200, 64)
    for path, approximate in (("exact", False), ("nndescent", True)):
        for call in ("first", "second"):
            started = time.perf_counter()
            umap.UMAP(random_state=0, n_jobs=1, force_approximation_algorithm=approximate).fit_transform(data)
            timings[f"{path}_{call}_s"] = time.perf_counter() - started
    print(json.dumps(timings))


def child(method: str, size: int, dim: int) -> None:
    """In a fresh process: PCA then one layout of ``size`` points; prints seconds and peak memory as JSON."""
    from dissect.stages import embed

    features = mixture_features(size, dim)
    if method == "umap":  # compile numba's functions first, on both nearest-neighbour paths
        import umap

        for approximate in (False, True):
            umap.UMAP(random_state=0, n_jobs=1, force_approximation_algorithm=approximate).fit_transform(
                features[:200, :64])
    started = time.perf_counter()
    reduced, _ = embed.pca_features(features, PCA_COMPONENTS, seed=0)
    print(json.dumps({"pca_s": time.perf_counter() - started}), flush=True)
    started = time.perf_counter()
    if method == "tsne":
        embed.tsne_layout(reduced, 30.0, seed=0)
    elif method == "umap":
        embed.umap_layout(reduced, 15, 0.1, seed=0)
    else:
        embed.nearest_neighbours(features, embed.choose_queries(size, 6, seed=0), 6)
    print(json.dumps({"method_s": time.perf_counter() - started, "peak_rss_mib": peak_rss_mib()}))


def peak_rss_mib() -> float:
    """Peak RSS of this process (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def run_child(arguments: list[str], timeout: float) -> dict:
    """Run this script with ``arguments`` in a fresh process; the JSON lines it printed, merged.

    A run past ``timeout`` is stopped; what it printed so far is returned (without "method_s").
    """
    command = [sys.executable, str(Path(__file__).resolve()), *arguments]
    try:
        output = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=True).stdout
    except subprocess.TimeoutExpired as stopped:
        output = stopped.stdout.decode() if isinstance(stopped.stdout, bytes) else stopped.stdout or ""
    merged: dict = {}
    for line in output.splitlines():
        if line.startswith("{"):
            merged |= json.loads(line)
    return merged


def load() -> str:
    return "load average %.1f %.1f %.1f" % os.getloadavg()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 50000])
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds allowed to one (size, method) run")
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "SIZE", "DIM"), help=argparse.SUPPRESS)
    parser.add_argument("--compile-probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.compile_probe:
        compile_probe()
        return
    if args.child:
        child(args.child[0], int(args.child[1]), int(args.child[2]))
        return
    print(f"{os.cpu_count()} cores, {load()}")
    probe = run_child(["--compile-probe"], args.timeout)
    compile_s = sum(probe[f"{path}_first_s"] - probe[f"{path}_second_s"] for path in ("exact", "nndescent"))
    print(f"umap-learn, fresh process: import {probe['import_s']:.1f} s; first fit of 200 points "
          f"{probe['exact_first_s']:.1f} s (second {probe['exact_second_s']:.2f} s); first NN-descent fit "
          f"{probe['nndescent_first_s']:.1f} s (second {probe['nndescent_second_s']:.2f} s): compile cost "
          f"about {compile_s:.0f} s")
    names = {"tsne": "t-SNE", "umap": "UMAP", "neighbours": "6 queries x 6 nearest neighbours, full D"}
    for size in args.sizes:
        print(f"\n{size} points x {args.dim} features, float32 ({size * args.dim * 4 / 2**20:.0f} MiB); {load()}")
        for method in ("tsne", "umap", "neighbours"):
            result = run_child(["--child", method, str(size), str(args.dim)], args.timeout)
            if method != "neighbours" and "pca_s" in result:
                print(f"  {'PCA to ' + str(PCA_COMPONENTS) + ' (in the ' + names[method] + ' run)':<42} "
                      f"{result['pca_s']:8.1f} s")
            if "method_s" not in result:
                print(f"  {names[method]:<42} did not finish within {args.timeout:.0f} s (stopped); "
                      f"choose smaller --sizes or a larger --timeout")
                continue
            print(f"  {names[method]:<42} {result['method_s']:8.1f} s   peak RSS {result['peak_rss_mib']:.0f} MiB")
            if method != "neighbours":
                print(f"  {names[method] + ' including PCA':<42} {result['pca_s'] + result['method_s']:8.1f} s")
        print(f"  ({load()})")

if __name__ == "__main__":
    main()
