"""Benchmark of the embed stage's projections: PCA to 50, t-SNE and UMAP at 10k and 50k points.

Usage: ``python benchmarks/embed.py [--sizes 10000 50000] [--dim 4096] [--sklearn-max 10000] [--timeout 600]``

Features are random but structured like a network's penultimate layer: a
mixture of 20 Gaussians in a 32-d subspace of the ``--dim``-d space plus
isotropic noise, float32. First, a fresh process measures umap-learn's import
and its first-call (numba compile) cost on a tiny input, for the exact
nearest-neighbour path (N < 4096) and the NN-descent path. Then each
(size, method) runs in a fresh process, UMAP compiled beforehand on a tiny
input so that its time excludes compilation, timing the PCA step and the
layout apart; a run that exceeds ``--timeout`` seconds is stopped and reported.
Each layout's trustworthiness (PCA features against the 2-D coordinates, 10
neighbours, on the stage's seeded sample of 2,000 points) is printed beside its
time, and at sizes up to ``--sklearn-max`` scikit-learn's t-SNE (Barnes-Hut,
PCA init, learning rate 'auto', the stage's perplexity) runs on the same PCA
features for comparison. Per size, the total the embed stage spends on the
layouts (PCA once, t-SNE and UMAP) is printed; the issue's target is 90 s at
50,000 points.
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
PERPLEXITY = 30.0
TRUST_SAMPLE = 2000
TRUST_NEIGHBOURS = 10


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
    coords = None
    if method == "tsne":
        coords = embed.tsne_layout(reduced, PERPLEXITY, seed=0)
    elif method == "sklearn-tsne":
        from sklearn.manifold import TSNE

        coords = TSNE(n_components=2, perplexity=PERPLEXITY, init="pca", learning_rate="auto", random_state=0,
                      n_jobs=os.cpu_count()).fit_transform(reduced)
    elif method == "umap":
        coords = embed.umap_layout(reduced, 15, 0.1, seed=0)
    else:
        embed.nearest_neighbours(features, embed.choose_queries(size, 6, seed=0), 6)
    result = {"method_s": time.perf_counter() - started, "peak_rss_mib": peak_rss_mib()}
    if coords is not None:
        result["trustworthiness"] = embed.trustworthiness_scores(reduced, {method: coords}, min(TRUST_SAMPLE, size),
                                                                 TRUST_NEIGHBOURS, seed=0)[method]
    print(json.dumps(result))


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
    parser.add_argument("--sklearn-max", type=int, default=10000,
                        help="largest size at which scikit-learn's t-SNE runs too (it grows badly with points)")
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
    names = {"tsne": "t-SNE (openTSNE)", "umap": "UMAP", "sklearn-tsne": "t-SNE (scikit-learn, for comparison)",
             "neighbours": "6 queries x 6 nearest neighbours, full D"}
    for size in args.sizes:
        print(f"\n{size} points x {args.dim} features, float32 ({size * args.dim * 4 / 2**20:.0f} MiB); {load()}")
        methods = ["tsne", "umap"] + (["sklearn-tsne"] if size <= args.sklearn_max else []) + ["neighbours"]
        seconds: dict[str, float] = {}
        for method in methods:
            result = run_child(["--child", method, str(size), str(args.dim)], args.timeout)
            if "pca_s" in result:
                seconds.setdefault("pca", result["pca_s"])
                print(f"  {'PCA to ' + str(PCA_COMPONENTS) + ' (in the ' + names[method] + ' run)':<42} "
                      f"{result['pca_s']:8.1f} s")
            if "method_s" not in result:
                print(f"  {names[method]:<42} did not finish within {args.timeout:.0f} s (stopped); "
                      f"choose smaller --sizes or a larger --timeout")
                continue
            seconds[method] = result["method_s"]
            trust = f"   trustworthiness {result['trustworthiness']:.3f}" if "trustworthiness" in result else ""
            print(f"  {names[method]:<42} {result['method_s']:8.1f} s   peak RSS {result['peak_rss_mib']:.0f} MiB"
                  f"{trust}")
        if all(step in seconds for step in ("pca", "tsne", "umap")):
            print(f"  {'the stage: PCA + t-SNE + UMAP':<42} {seconds['pca'] + seconds['tsne'] + seconds['umap']:8.1f} s")
        print(f"  ({load()})")

if __name__ == "__main__":
    main()
