"""Soft reference update on ~100M parameters: fused foreach lerp vs a per-parameter Python loop
(how TRL's sync callback mixes weights) vs a plain copy of the same bytes (the memory floor).

    python benchmarks/ref_update.py [--params 100e6] [--repeats 5]

Prints median times and ratios from one run; compare ratios, not seconds (machines are noisy).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from trainers.trdpo import soft_update_


def model_like_tensors(n_params: float, seed: int) -> list[torch.Tensor]:
    """Shapes of a ~100M-parameter decoder: 12 layers of 768-wide attention + MLP, plus embeddings."""
    g = torch.Generator().manual_seed(seed)
    hidden, shapes = 768, []
    shapes.append((50304, hidden))
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
    args = parser.parse_args()
    policy, ref = model_like_tensors(args.params, 0), model_like_tensors(args.params, 1)
    n = sum(t.numel() for t in ref)
    print(f"{n / 1e6:.1f}M fp32 parameters in {len(ref)} tensors, torch {torch.__version__}, {torch.get_num_threads()} threads")
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
