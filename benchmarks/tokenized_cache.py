"""What the tokenized cache saves each training that reads the same data: ``load_pairs`` (read,
parse, tokenize both splits) without the cache vs from a cache entry, in the same run.

    python benchmarks/tokenized_cache.py [--pairs 20000] [--quick]

The data: HH-like long-tailed lengths (trainers.data.synthetic.HH_LIKE: prompts ~100 words, responses
~60, log-normal) of English-like words, written as a preference JSONL file; the tokenizer: a
byte-level BPE (GPT-NeoX's kind) trained here on the same kind of text, since no tokenizer can be
downloaded. Every trial of a sweep and every variant and seed of a study pays the uncached time
once per worker; with the cache, once per machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

LEXICON_SEED = 7


def lexicon(size: int = 3000) -> list[str]:
    rng = random.Random(LEXICON_SEED)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    weights = [26 - i for i in range(26)]
    return ["".join(rng.choices(letters, weights, k=rng.randint(2, 9))) for _ in range(size)]


def bpe_tokenizer(words: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    rng = random.Random(0)
    corpus = (" ".join(rng.choices(words, k=40)) for _ in range(20000))
    backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<|endoftext|>"]))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<|endoftext|>")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="500 pairs, 1 repeat: checks the script, measures nothing.")
    args = parser.parse_args()
    if args.quick:
        args.pairs, args.repeats = 500, 1
        print("QUICK (checks the script; numbers mean nothing)", flush=True)

    from trainers.config import DataConfig
    from trainers.data.loading import load_pairs
    from trainers.data.synthetic import HH_LIKE, length_profile_texts

    words = lexicon()
    tokenizer = bpe_tokenizer(words, 8000 if args.quick else 16000)
    rows = length_profile_texts(args.pairs, 0, HH_LIKE, 512, 512, word=lambda rng: rng.choice(words), separator=" ")
    with tempfile.TemporaryDirectory(prefix="trdpo-bench-") as tmp:
        path = Path(tmp) / "pairs.jsonl"
        path.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in rows))
        data = DataConfig(format="preference", path=str(path), max_length=1024, max_prompt_length=512)

        def timed(cache: str) -> tuple[float, tuple]:
            os.environ["TRDPO_TOKENIZED_CACHE"] = cache
            start = time.perf_counter()
            pairs = load_pairs(data, tokenizer, rank=1)  # rank 1: no console lines in the timing
            return time.perf_counter() - start, pairs

        uncached = [timed("off") for _ in range(args.repeats)]
        first = timed(str(Path(tmp) / "cache"))  # a miss: tokenizes and writes the entry
        cached = [timed(str(Path(tmp) / "cache")) for _ in range(args.repeats)]
    assert cached[0][1] == uncached[0][1], "a cache hit returned other pairs"
    tokens = sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in uncached[0][1][0] + uncached[0][1][1])
    cold, warm = statistics.median(t for t, _ in uncached), statistics.median(t for t, _ in cached)
    print(f"{args.pairs} HH-like pairs ({tokens / 1e6:.1f}M tokens), byte-level BPE of {len(tokenizer)} tokens; "
          f"median of {args.repeats}:", flush=True)
    print(f"  load_pairs, no cache: {cold:.2f} s; first run with the cache (tokenize + write): {first[0]:.2f} s; "
          f"from the cache: {warm:.2f} s")
    print(f"cached/uncached load time {warm / cold:.3f}x (the same pairs: True)")


if __name__ == "__main__":
    main()
