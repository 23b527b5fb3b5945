"""Judge-pool throughput against a loopback judge with a fixed latency, as a fraction of the ideal
(total concurrency / latency), and batched vs one-prompt-at-a-time generation on one model.

    python benchmarks/judge_pool.py judge [--actors 4 --concurrency 8 --latency 0.05 --items 400]
    python benchmarks/judge_pool.py generate
    python benchmarks/judge_pool.py judge|generate --quick   # tiny settings, seconds: checks the script, measures nothing

Both orders are judged, so each item is two requests. Target: >= 0.9 of the ideal.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the loopback judge is test scaffolding


def run_judge(args) -> None:
    import ray

    from evaluation.config import JudgeConfig
    from loopback_judge import LoopbackJudge
    from evaluation.pool import judge_with_pool
    from evaluation.protocol import Item

    # A Ray of its own (never one recorded on the machine by another `ray start`), stopped at the end.
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    items = [Item(str(i), f"question {i}", f"a good answer {i}", f"an answer {i}") for i in range(args.items)]
    with LoopbackJudge(latency_s=args.latency) as server, tempfile.TemporaryDirectory() as tmp:
        cfg = JudgeConfig(backend="openai", model="loopback", base_url=server.base_url, template="hh",
                          concurrency=args.concurrency, timeout_s=30)
        # Warm-up: actor start-up and imports are not the pool's steady-state throughput.
        judge_with_pool(items[: args.actors * 2], cfg, f"{tmp}/warm.sqlite", args.actors, both_orders=True, label="warm-up")
        server.calls, server.first_request_at = 0, None
        start = time.perf_counter()
        results, _ = judge_with_pool(items, cfg, f"{tmp}/cache.sqlite", args.actors, both_orders=True, label="judge")
        wall = time.perf_counter() - start
        calls = server.calls
        # Steady state as the judge sees it: first request to last response (actor start-up excluded).
        elapsed = server.last_response_at - server.first_request_at
    ideal = args.actors * args.concurrency / args.latency
    rate = calls / elapsed
    print(f"{'QUICK (checks the script; numbers mean nothing): ' if args.quick else ''}{args.actors} actors x {args.concurrency} concurrent, latency {args.latency * 1e3:.0f} ms: "
          f"{calls} requests in {elapsed:.2f} s = {rate:.0f} req/s; ideal {ideal:.0f} req/s; fraction {rate / ideal:.2f} (target >= 0.9); "
          f"wall with actor start-up {wall:.2f} s")
    ray.shutdown()
    wrong = [r for r in results if r.outcome != "win"]
    if wrong:  # the loopback judge prefers the "good" answer in both orders: anything else is a failed call
        raise RuntimeError(f"{len(wrong)} of {len(results)} judgments are not wins, e.g. {wrong[0].outcome}: {wrong[0].errors}")


def run_generate(args) -> None:
    import torch

    from evaluation.config import SamplingConfig
    from evaluation.generation import generate
    from trainers.config import TinyModelConfig
    from trainers.model.build import build_tiny_model, make_byte_tokenizer

    tokenizer = make_byte_tokenizer()
    size = (TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64) if args.quick
            else TinyModelConfig(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=512))
    model = build_tiny_model(size, len(tokenizer), tokenizer.pad_token_id).eval()
    prompts = [(str(i), f"Review of the item number {i}:") for i in range(args.prompts)]
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=8 if args.quick else 32, batch_size=args.batch, seed=0)
    if args.quick:
        print("QUICK (checks the script; numbers mean nothing)")
    times = {}
    for name, batch in (("batched", args.batch), ("one at a time", 1)):
        start = time.perf_counter()
        generate(model, tokenizer, prompts, cfg, batch_size=batch)
        times[name] = time.perf_counter() - start
        print(f"{name:14s} (batch {batch:3d}): {times[name]:.2f} s for {len(prompts)} prompts", flush=True)
    print(f"speed-up batched/one-at-a-time: {times['one at a time'] / times['batched']:.1f}x "
          f"({torch.get_num_threads()} threads)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["judge", "generate"])
    parser.add_argument("--actors", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--items", type=int, default=400)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="Tiny settings, seconds: checks the script, measures nothing.")
    args = parser.parse_args()
    if args.quick:  # a handful of requests / prompts through the same code
        args.actors, args.concurrency, args.latency, args.items = 2, 4, 0.02, 24
        args.prompts, args.batch = 8, 4
    {"judge": run_judge, "generate": run_generate}[args.what](args)


if __name__ == "__main__":
    main()
