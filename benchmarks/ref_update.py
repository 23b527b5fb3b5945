"""Soft reference update on ~100M parameters: fused foreach lerp vs a per-parameter Python loop
(how TRL's sync callback mixes weights) vs a plain copy of the same bytes (the memory floor).

    python benchmarks/ref_update.py [--params 100e6] [--repeats 9]
    python benchmarks/ref_update.py --quick     # ~1M parameters, 3 rounds: checks the script, measures nothing

Prints median times and ratios from one run; compare ratios, not seconds (machines are noisy).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainers.trdpo import soft_update_  # noqa: E402


def model_like_tensors(n_params: float, seed: int, hidden: int = 768, vocab: int = 50304) -> list[torch.Tensor]:
    """Shapes of a decoder (by default ~100M parameters: 12 layers of 768-wide attention + MLP, plus embeddings)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(vocab, hidden)]
    while sum(torch.Size(s).numel() for s in shapes) < n_params:
        shapes += [(hidden, hidden)] * 4 + [(4 * hidden, hidden), (hidden, 4 * hidden), (hidden,), (hidden,)]
    return [torch.randn(s, generator=g) for s in shapes]


def python_loop_update(ref, policy, alpha):
    with torch.no_grad():
        for r, p in zip(ref, policy):
            r.mul_(1.0 - alpha).add_(p, alpha=alpha)


def copy_floor(ref, policy, alpha):
    with torch.no_grad():
        for r, p in zip(ref, policy):
            r.copy_(p)


def timed_interleaved(fns: dict, ref, policy, repeats: int) -> dict[str, float]:
    """Median seconds per variant; variants take turns in every round so that a noisy moment
    (another process, frequency change) hits all of them alike."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn(ref, policy, 0.6)  # warm up: first touch of pages, thread pool start
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn(ref, policy, 0.6)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=100e6)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="~1M parameters, 3 rounds: checks the script, measures nothing.")
    args = parser.parse_args()
    shape = {"hidden": 128, "vocab": 512} if args.quick else {}
    if args.quick:
        args.params, args.repeats = 1e6, 3
    policy, ref = model_like_tensors(args.params, 0, **shape), model_like_tensors(args.params, 1, **shape)
    n = sum(t.numel() for t in ref)
    print(f"{'QUICK (checks the script; numbers mean nothing): ' if args.quick else ''}{n / 1e6:.1f}M fp32 parameters in {len(ref)} tensors, torch {torch.__version__}, {torch.get_num_threads()} threads")
    results = timed_interleaved(
        {
            "foreach_lerp (ours)": soft_update_,
            "python loop mul_/add_ (TRL-style)": python_loop_update,
            "copy_ (bandwidth floor)": copy_floor,
        },
        ref, policy, args.repeats,
    )
    floor = results["copy_ (bandwidth floor)"]
    ours = results["foreach_lerp (ours)"]
    for name, seconds in results.items():
        print(f"{name:36s} {seconds * 1e3:8.1f} ms  {seconds / floor:5.2f}x copy")
    print(f"ratio ours/copy = {ours / floor:.2f} (target <= 1.3); python-loop/ours = {results['python loop mul_/add_ (TRL-style)'] / ours:.2f}")


if __name__ == "__main__":
    main()
