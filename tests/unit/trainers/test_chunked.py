"""Chunked log-probs and KL from hidden states (trainers.trdpo.chunked) against whole logits."""

import math

import pytest
import torch
import torch.nn.functional as F

from trainers.trdpo.chunked import linear_token_kl, linear_token_logprobs, sum_by_sequence

pytestmark = pytest.mark.exactness


def whole(hidden, weight, bias, targets):
    return torch.log_softmax(F.linear(hidden, weight, bias).float(), -1).gather(-1, targets[:, None]).squeeze(-1)


@pytest.fixture
def problem():
    generator = torch.Generator().manual_seed(0)
    n, h, v = 37, 8, 11
    hidden = torch.randn(n, h, generator=generator)
    weight = torch.randn(v, h, generator=generator)
    bias = torch.randn(v, generator=generator)
    targets = torch.randint(0, v, (n,), generator=generator)
    return hidden, weight, bias, targets


def test_gradients_are_exact_in_double_precision(problem):
    hidden, weight, bias, targets = (t.double().requires_grad_() if t.is_floating_point() else t for t in problem)
    assert torch.autograd.gradcheck(lambda h, w, b: linear_token_logprobs(h, w, b, targets, chunk=5), (hidden, weight, bias))


@pytest.mark.parametrize("chunk", [1, 4, 36, 37, 1000])
def test_values_and_gradients_equal_whole_logits_in_fp32(problem, chunk):
    hidden, weight, bias, targets = problem
    upstream = torch.randn(hidden.shape[0], generator=torch.Generator().manual_seed(1))
    grads = []
    for fn in (lambda h, w, b: linear_token_logprobs(h, w, b, targets, chunk), lambda h, w, b: whole(h, w, b, targets)):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        out = fn(*leaves)
        (out * upstream).sum().backward()
        grads.append((out.detach(), *(leaf.grad for leaf in leaves)))
    for mine, reference in zip(*grads):
        assert torch.allclose(mine, reference, atol=2e-6, rtol=1e-5), (mine - reference).abs().max()


def test_bf16_autocast_matches_the_autocast_linear_path(problem):
    hidden, weight, _, targets = problem
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mine = linear_token_logprobs(hidden, weight, None, targets, chunk=8)
        reference = whole(hidden, weight, None, targets)  # F.linear in bf16, log-softmax in fp32
    assert mine.dtype == torch.float32
    assert torch.allclose(mine, reference, atol=1e-5)  # the bf16 logits are the same; fp32 log-softmax rounding differs


def test_the_whole_logits_are_never_saved_for_backward(problem):
    # The point of chunking: nothing of size [N, V] outlives the forward. Every tensor autograd
    # keeps for the backward is recorded here.
    hidden, weight, bias, targets = problem
    hidden = hidden.repeat(30, 1).requires_grad_()  # N = 1110 rows, V = 11: an [N, V] tensor has 12,210 elements
    targets = targets.repeat(30)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        linear_token_logprobs(hidden, weight.requires_grad_(), bias, targets, chunk=16).sum().backward()
    n, v = hidden.shape[0], weight.shape[0]
    assert max(saved) < n * v  # the largest is the hidden states themselves, [N, H]
    assert max(saved) == hidden.numel()


def test_kl_and_both_log_probs_equal_whole_distributions(problem):
    hidden, weight, bias, targets = problem
    generator = torch.Generator().manual_seed(2)
    base_hidden, base_weight = torch.randn(hidden.shape, generator=generator), torch.randn(weight.shape, generator=generator)
    logp, base_logp, kl = linear_token_kl(hidden, weight, bias, base_hidden, base_weight, None, targets, chunk=6)
    p = torch.log_softmax(F.linear(hidden, weight, bias), -1)
    q = torch.log_softmax(F.linear(base_hidden, base_weight), -1)
    assert torch.allclose(kl, (p.exp() * (p - q)).sum(-1), atol=1e-6)
    assert torch.allclose(logp, whole(hidden, weight, bias, targets), atol=1e-6)
    assert torch.allclose(base_logp, whole(base_hidden, base_weight, None, targets), atol=1e-6)
    same = linear_token_kl(hidden, weight, bias, hidden, weight, bias, targets, chunk=6)[2]
    assert same.abs().max() < 1e-6  # KL of a distribution to itself


def test_sum_by_sequence_adds_each_sequences_tokens():
    values = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0], requires_grad=True)
    sums = sum_by_sequence(values, torch.tensor([2, 0, 2, 1, 0]), 4)
    assert sums.tolist() == [18.0, 8.0, 5.0, 0.0]
    sums[2].backward()
    assert values.grad.tolist() == [1.0, 0.0, 1.0, 0.0, 0.0]


def test_bad_shapes_and_chunks_are_refused(problem):
    hidden, weight, bias, targets = problem
    with pytest.raises(ValueError, match="targets"):
        linear_token_logprobs(hidden, weight, bias, targets[:-1])
    with pytest.raises(ValueError, match="chunk"):
        linear_token_logprobs(hidden, weight, bias, targets, chunk=0)


class LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of the tensors that ops create inside the mode and that are still alive: ``peak`` of
    their sum, and every allocation as ``(shape, dtype)`` (outputs that alias an input, such as
    in-place results and views, are no new memory)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.allocations: list[tuple[tuple, torch.dtype]] = []

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import weakref

        from torch.utils._pytree import tree_leaves

        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                nbytes = t.untyped_storage().nbytes()
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                self.allocations.append((tuple(t.shape), t.dtype))
                weakref.finalize(t, self._free, nbytes)
        return out


def bf16_head_backward(n: int, h: int, v: int, chunk: int):
    """The chunked head's backward under bf16 autocast over fp32 weights (random ``n x h`` hidden
    states, a ``v x h`` weight), its allocations tracked: ``(LiveBytes, (grad_hidden, grad_weight))``."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=generator, requires_grad=True)
    weight = torch.randn(v, h, generator=generator, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_token_logprobs(hidden, weight, None, targets, chunk)
    with LiveBytes() as tracked:
        grads = torch.autograd.grad(out.sum(), (hidden, weight))
    return tracked, grads


@pytest.mark.parametrize("chunk", [4, 16])
def test_bf16_backward_memory_is_one_accumulator_and_the_cast_whatever_the_number_of_chunks(chunk):
    """bf16 autocast over fp32 weights: the backward holds the fp32 gradient (V x H), the weight's
    bf16 cast (V x H) and [chunk, V]-sized temporaries; no [V, H] product per chunk, nor its fp32 copy."""
    n, h, v = 64, 128, 512
    tracked, (grad_h, grad_w) = bf16_head_backward(n, h, v, chunk)
    assert grad_w.dtype == torch.float32 and grad_h.dtype == torch.float32
    weight_sized = [(shape, dtype) for shape, dtype in tracked.allocations if math.prod(shape) >= v * h // 4]
    assert sorted(weight_sized, key=str) == [((v, h), torch.bfloat16), ((v, h), torch.float32)]  # the cast, the gradient
    bound = v * h * (4 + 2) + chunk * v * 16 + n * h * 8  # the two, [chunk, V] temporaries, dh and its pieces
    assert tracked.peak <= bound, (tracked.peak, bound)


def test_bf16_weight_gradient_equals_the_unchunked_autocast_path(problem):
    hidden, weight, bias, targets = problem
    hidden, weight = hidden.repeat(8, 1), weight.repeat(40, 1)  # V = 440 > H = 8: several vocabulary blocks
    targets = torch.randint(0, weight.shape[0], (hidden.shape[0],), generator=torch.Generator().manual_seed(3))
    grads = []
    for fn in (lambda h, w: linear_token_logprobs(h, w, None, targets, chunk=16), lambda h, w: whole(h, w, None, targets)):
        leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fn(*leaves).sum().backward()
        grads.append([leaf.grad for leaf in leaves])
    for mine, reference in zip(*grads):
        assert mine.dtype == reference.dtype == torch.float32
        assert torch.allclose(mine, reference, atol=2e-2, rtol=2e-2), (mine - reference).abs().max()


def test_small_logits_are_scored_whole_and_large_ones_in_chunks(monkeypatch):
    """The chunked head scores label rows whole (no recomputation in the backward) where their fp32
    logits are small, and in chunks where they are large; both equal whole logits, gradients too."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from trainers.model import scoring
    from trainers.data.batching import collate_pairs
    from trainers.config import TrainingConfig
    from trainers.data.types import TokenizedPair
    from trainers.trdpo import chunked

    assert chunked.scores_whole(500, 259, chunk=64)  # 0.5 MB of logits
    assert not chunked.scores_whole(5000, 50304, chunk=1024)  # 1 GB: chunked
    assert chunked.scores_whole(1000, 50304, chunk=1024)  # fits one chunk anyway
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=32, n_layer=1, n_head=2, n_positions=64)).eval()
    batch = collate_pairs([TokenizedPair([5, 6, 7], [8, 9, 10, 11], [12, 13], 0),
                           TokenizedPair([14], [15, 16], [17, 18, 19], 1)], 0)

    def logps_and_grads(cfg):
        model.zero_grad()
        out = scoring.Scorer(model, TrainingConfig(max_steps=1, **cfg), bf16=False).sequence_logps(batch, average=False)[0]
        out.sum().backward()
        return out.detach(), model.lm_head.weight.grad.clone()

    expected = logps_and_grads({"packing": False, "logprob_chunk_tokens": None})
    calls = []
    original = scoring.linear_token_logprobs
    monkeypatch.setattr(scoring, "linear_token_logprobs", lambda *a: calls.append(1) or original(*a))
    whole = logps_and_grads({"logprob_chunk_tokens": 2})  # 11 label rows x 300 x 4 bytes: small
    assert calls == []
    monkeypatch.setattr(chunked, "WHOLE_LOGITS_BYTES", 0)
    chunks = logps_and_grads({"logprob_chunk_tokens": 2})
    assert calls == [1]
    for got in (whole, chunks):
        assert torch.allclose(got[0], expected[0], atol=1e-5) and torch.allclose(got[1], expected[1], atol=1e-6)
