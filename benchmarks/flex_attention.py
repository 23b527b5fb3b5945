"""FlexAttention document masking vs SDPA on packed rows, on this machine, start-up included.

    python benchmarks/flex_attention.py [--repeats 5] [--threads 2]
    python benchmarks/flex_attention.py --quick     # small shapes, 1 repeat: checks the script, measures nothing

A packed row holds several sequences; attention must stay inside each (causal, block-diagonal).
What transformers runs today with SDPA is the row's whole square under a dense boolean mask. The
question (issue 23, item 2): does ``torch.nn.attention.flex_attention`` with a document mask
(``create_block_mask``, blocks outside every sequence skipped) compute the same thing faster on
this CPU, and does its compilation pay for itself on a short run?

Per layout, forward + backward of one attention call (queries, keys, values of the body-heavy
benchmark model: 6 heads of 64), the median of ``--repeats``:

* **SDPA, dense block-diagonal mask**: the packed path's cost today;
* **SDPA, one sequence per row, is_causal**: the padded layout the cost model falls back to;
* **flex, compiled**: ``torch.compile(flex_attention)`` with the document block mask (the mask
  rebuilt each call, as each micro-batch has its own boundaries);
* **flex, eager**: without compilation (torch warns it is for debugging: it materialises scores).

Reported: each variant's time as a ratio to the dense-mask SDPA, the largest difference of its
output and input gradients from that reference, the first call's time (compilation) and the time
of a call at a new row width (what each micro-batch of a different width pays unless shapes are
marked dynamic), and how many attention calls the compiled kernel needs to earn its start-up back.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

# Inductor compiles in a pool of worker processes that keep running after the first call: on 2
# cores they would slow whatever is timed next. One thread: the compile time is all in the first call.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HEADS, HEAD_DIM = 6, 64


def document_ids(lengths: list[int], width: int) -> torch.Tensor:
    """Sequence index per position of one row; the padding after the sequences is a document of its own."""
    ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    return torch.cat([ids, torch.full((width - ids.numel(),), len(lengths))])


def dense_mask(documents: torch.Tensor) -> torch.Tensor:
    n = documents.numel()
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    return causal & (documents[:, None] == documents[None, :])


def qkv(width: int, seed: int, grad: bool) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, HEADS, width, HEAD_DIM, generator=g).requires_grad_(grad) for _ in range(3)]


def forward_backward(attention, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The output and the inputs' gradients (none when the inputs need none: forward only)."""
    for t in tensors:
        t.grad = None
    out = attention(*tensors)
    if not tensors[0].requires_grad:
        return out.detach(), []
    out.backward(torch.ones_like(out))
    return out.detach(), [t.grad.clone() for t in tensors]


def sdpa_dense(documents):
    mask = dense_mask(documents)
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def sdpa_per_sequence(lengths: list[int]):
    """One sequence per row, each padded to the longest, causal: the padded layout's work."""
    longest = max(lengths)

    def attention(q, k, v):
        starts = [sum(lengths[:i]) for i in range(len(lengths))]
        rows = [torch.nn.functional.pad(t[:, :, s:s + n], (0, 0, 0, longest - n)) for t in (q, k, v)
                for s, n in zip(starts, lengths)]
        per = len(lengths)
        out = F.scaled_dot_product_attention(torch.cat(rows[:per]), torch.cat(rows[per:2 * per]), torch.cat(rows[2 * per:]),
                                             is_causal=True)
        packed = torch.cat([out[i:i + 1, :, :n] for i, n in enumerate(lengths)], dim=2)
        return torch.nn.functional.pad(packed, (0, 0, 0, q.shape[2] - packed.shape[2]))  # the row's padding: zeros

    return attention


def flex(documents, compiled_kernel):
    from torch.nn.attention.flex_attention import create_block_mask

    def attention(q, k, v):
        docs = documents

        def causal_document(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (docs[q_idx] == docs[kv_idx])

        block_mask = create_block_mask(causal_document, None, None, docs.numel(), docs.numel(), device="cpu")
        return compiled_kernel(q, k, v, block_mask=block_mask)

    return attention


def timed(attention, tensors, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        forward_backward(attention, tensors)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="Small shapes, 1 repeat: checks the script, measures nothing.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from torch.nn.attention.flex_attention import flex_attention

    scale = 4 if args.quick else 1
    repeats = 1 if args.quick else args.repeats
    # Rows as the cost model would have packed them at width 512 (mid-length: three of ~150 tokens;
    # HH-like: one long sequence and short ones; TL;DR-like: one sequence, nothing to pack).
    layouts = {"mid-length, 3 x ~150 in 512": [152, 147, 158], "HH-like, 310 + 120 + 60 in 512": [310, 120, 60],
               "HH-like, 8 short in 512": [70, 64, 58, 55, 61, 66, 52, 60]}
    layouts = {name: [max(4, n // scale) for n in lengths] for name, lengths in layouts.items()}
    width = 512 // scale
    print(f"torch {torch.__version__}, CPU, {args.threads} threads; {HEADS} heads x {HEAD_DIM}; one "
          f"attention call, median of {repeats}", flush=True)

    compiled = torch.compile(flex_attention)
    first = None
    train = True  # forward and backward, as training needs; forward only where flex has no backward here
    try:
        probe = [max(4, n // scale) for n in (100, 60)]
        flex(document_ids(probe, width), flex_attention)(*qkv(width, seed=0, grad=True)).sum().backward()
    except NotImplementedError as exc:
        train = False
        print(f"flex_attention cannot train here: {exc} Measuring the forward alone (what the reference and "
              f"validation forwards would use).", flush=True)
    start = time.perf_counter()
    for name, lengths in layouts.items():
        documents = document_ids(lengths, width)
        tensors = qkv(width, seed=0, grad=train)
        reference_out, reference_grads = forward_backward(sdpa_dense(documents), tensors)
        variants = {"SDPA, dense block-diagonal mask": sdpa_dense(documents),
                    "SDPA, one sequence per row (is_causal)": sdpa_per_sequence(lengths),
                    "flex, compiled": flex(documents, compiled), "flex, eager": flex(documents, flex_attention)}
        if first is None:  # the compiled kernel's start-up: its first call, compilation included
            forward_backward(variants["flex, compiled"], tensors)
            first = time.perf_counter() - start
            print(f"flex, compiled: first call (compilation{', forward and backward' if train else ', forward'}) "
                  f"{first:.2f} s", flush=True)
        times = {}
        for variant, attention in variants.items():
            try:
                out, grads = forward_backward(attention, tensors)
            except Exception as exc:  # noqa: BLE001 - a variant this install cannot run is a result too
                print(f"  {name}: {variant:<40} cannot run here: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                continue
            real = documents < len(lengths)  # the padding's own outputs are never read
            error = max([float((out - reference_out)[:, :, real].abs().max())] +
                        [float((g - r)[:, :, real].abs().max()) for g, r in zip(grads, reference_grads)])
            times[variant] = timed(attention, tensors, repeats)
            print(f"  {name}: {variant:<40} {times[variant] * 1e3:8.2f} ms "
                  f"({times[variant] / times['SDPA, dense block-diagonal mask']:.2f}x the dense mask), "
                  f"max |difference| {error:.1e}", flush=True)
        if "flex, compiled" not in times:
            continue
        saving = times["SDPA, dense block-diagonal mask"] - times["flex, compiled"]
        if saving > 0:
            print(f"  {name}: compiled flex saves {saving * 1e3:.2f} ms per call: its start-up ({first:.1f} s) "
                  f"is earned back after {first / saving:.0f} calls", flush=True)
        else:
            print(f"  {name}: compiled flex saves nothing per call ({-saving * 1e3:.2f} ms slower)", flush=True)
    # A micro-batch of another width: a new shape, compiled again unless marked dynamic.
    other = width - 32 // scale
    documents = document_ids([140 // scale, 135 // scale, 150 // scale], other)
    start = time.perf_counter()
    try:
        forward_backward(flex(documents, compiled), qkv(other, seed=1, grad=train))
        print(f"flex, compiled: first call at a new width ({other}) {time.perf_counter() - start:.2f} s", flush=True)
    except Exception as exc:  # noqa: BLE001 - what a micro-batch of this width would meet
        print(f"flex, compiled: a new width ({other}) fails after {time.perf_counter() - start:.2f} s: "
              f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}", flush=True)


if __name__ == "__main__":
    main()
