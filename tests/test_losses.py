"""The fused, chunked decoder + cross-entropy against log_softmax + nll_loss, and the adaptive decoder.

The bound is the parity rule (tests/tolerances.py). In fp32 it holds with room: the example's own softmax kernels
run, and only the GEMMs' split changes the order of summation.
"""

import pytest
import torch
import torch.nn.functional as F

from fastlm.errors import FastlmError
from fastlm.model.adaptive import AdaptiveDecoder, default_cutoffs
from fastlm.model.fused_loss import linear_cross_entropy
from fastlm.model.loss_chunks import CPU_CHUNK_TOKENS, CUDA_CHUNK_BYTES, Chunking, default_chunking
from tests.tolerances import FP32_RTOL, LOW_PRECISION_FACTOR, relative_error


def reference(hidden, weight, bias, targets):
    return F.nll_loss(F.log_softmax(F.linear(hidden, weight, bias), dim=1), targets)


def random_problem(n, h, v, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).requires_grad_()
    weight = (0.3 * torch.randn(v, h, generator=g)).requires_grad_()
    b = torch.randn(v, generator=g).requires_grad_() if bias else None
    targets = torch.randint(v, (n,), generator=g)
    return hidden, weight, b, targets


@pytest.mark.parametrize("n, h, v, chunking", [
    (37, 8, 50, Chunking(10, 16)),       # a short last chunk of tokens, and of vocabulary columns
    (37, 8, 50, Chunking(64, None)),     # one chunk, one GEMM
    (96, 16, 121, Chunking(96, 1024)),   # the anchor test's sizes
    (300, 24, 1000, Chunking(128, 384)),
])
@pytest.mark.parametrize("bias", [True, False])
def test_value_and_every_gradient_match_log_softmax_nll(n, h, v, chunking, bias):
    hidden, weight, b, targets = random_problem(n, h, v, bias=bias)
    inputs = [t for t in (hidden, weight, b) if t is not None]
    want = reference(hidden, weight, b, targets)
    want_grads = torch.autograd.grad(want * 1.7, inputs)  # a loss gradient other than 1 reaches every input
    got = linear_cross_entropy(hidden, weight, b, targets, chunking)
    got_grads = torch.autograd.grad(got * 1.7, inputs)
    assert relative_error(got, want) <= FP32_RTOL
    for name, g, w in zip(("hidden", "weight", "bias")[:len(inputs)], got_grads, want_grads, strict=True):
        assert relative_error(g, w) <= FP32_RTOL, name


def test_tied_weights_gradients_add_up():
    """The decoder weight is also the embedding: both uses' gradients must reach it."""
    torch.manual_seed(0)
    v, h, n = 60, 12, 45
    weight = (0.2 * torch.randn(v, h)).requires_grad_()
    tokens, targets = torch.randint(v, (n,)), torch.randint(v, (n,))
    mix = torch.randn(h, h)

    def loss_with(loss_fn):
        hidden = torch.tanh(F.embedding(tokens, weight) @ mix)
        return loss_fn(hidden, weight, None, targets)

    want = torch.autograd.grad(loss_with(reference), weight)[0]
    got = torch.autograd.grad(loss_with(lambda *a: linear_cross_entropy(*a, chunking=Chunking(16, 32))), weight)[0]
    assert relative_error(got, want) <= FP32_RTOL


def test_without_gradients_only_the_value_is_computed():
    hidden, weight, b, targets = random_problem(50, 8, 70)
    want = reference(hidden, weight, b, targets)
    with torch.no_grad():
        got = linear_cross_entropy(hidden, weight, b, targets, Chunking(16, 32))
    assert not got.requires_grad and relative_error(got, want) <= FP32_RTOL
    # Only the weight needs a gradient: hidden's is not asked for and not returned.
    hidden, weight = hidden.detach(), weight.detach().requires_grad_()
    loss = linear_cross_entropy(hidden, weight, b.detach(), targets, Chunking(16, 32))
    (grad,) = torch.autograd.grad(loss, weight)
    want_grad = torch.autograd.grad(reference(hidden, weight, b.detach(), targets), weight)[0]
    assert relative_error(grad, want_grad) <= FP32_RTOL


def test_the_example_sizes_match():
    """2x200 on Wikitext-2's vocabulary with the CPU defaults: several chunks and vocabulary blocks."""
    hidden, weight, b, targets = random_problem(700, 200, 33_278)
    hidden.data.mul_(0.5)
    want = reference(hidden, weight, b, targets)
    want_grads = torch.autograd.grad(want, (hidden, weight, b))
    got = linear_cross_entropy(hidden, weight, b, targets)
    got_grads = torch.autograd.grad(got, (hidden, weight, b))
    assert relative_error(got, want) <= FP32_RTOL
    for g, w in zip(got_grads, want_grads, strict=True):
        assert relative_error(g, w) <= FP32_RTOL


def bf16_leaves(*tensors):
    return tuple(t.detach().bfloat16().requires_grad_() for t in tensors)


def test_low_precision_error_is_within_twice_plain_pytorch():
    """bf16 tensors (on CPU, the code path CUDA takes): error vs fp32 within 2x plain torch's in bf16."""
    hidden, weight, b, targets = random_problem(64, 32, 300)
    exact = reference(hidden, weight, b, targets)
    exact_grads = torch.autograd.grad(exact, (hidden, weight, b))
    low = bf16_leaves(hidden, weight, b)
    plain = F.cross_entropy(F.linear(*low), targets)
    plain_grads = torch.autograd.grad(plain, low)
    fused = linear_cross_entropy(*low, targets, Chunking(16, 128))
    fused_grads = torch.autograd.grad(fused, low)
    assert fused.dtype == torch.float32  # the loss is accumulated and returned in fp32
    assert abs(fused - exact) <= LOW_PRECISION_FACTOR * abs(plain.float() - exact) + 1e-6
    for f, p, e in zip(fused_grads, plain_grads, exact_grads, strict=True):
        assert f.dtype == torch.bfloat16
        assert relative_error(f.float(), e) <= LOW_PRECISION_FACTOR * relative_error(p.float(), e) + 1e-6


def test_mixed_dtypes_are_refused():
    hidden, weight, b, targets = random_problem(8, 4, 10)
    with pytest.raises(ValueError, match="one dtype"):
        linear_cross_entropy(hidden.bfloat16(), weight, b, targets)


def test_shape_errors_are_clear():
    hidden, weight, b, targets = random_problem(10, 8, 20)
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(hidden, weight, b, targets[:5])
    with pytest.raises(ValueError, match="hidden"):
        linear_cross_entropy(hidden[:, :4], weight, b, targets)


def test_default_chunking():
    cpu = default_chunking(torch.device("cpu"), 700, 33_278)
    assert cpu.tokens == CPU_CHUNK_TOKENS and cpu.vocab_block is not None
    assert default_chunking(torch.device("cpu"), 50, 33_278).tokens == 50
    cuda = default_chunking(torch.device("cuda"), 700, 33_278)
    assert cuda == Chunking(700, None)  # the example's step in one chunk
    big = default_chunking(torch.device("cuda"), 10**6, 267_735)
    assert big.tokens * 267_735 * 4 <= CUDA_CHUNK_BYTES


def test_default_cutoffs():
    assert default_cutoffs(33_278) == [2_000, 10_000]
    wikitext103 = default_cutoffs(267_735)  # scaled in proportion to the vocabulary
    assert [round(c / 267_735, 4) for c in wikitext103] == [round(c / 33_278, 4) for c in (2_000, 10_000)]
    small = default_cutoffs(121)
    assert small == sorted(set(small)) and 0 < small[0] and small[-1] <= 120
    assert default_cutoffs(2) == [1]


def test_adaptive_decoder_is_a_distribution_over_words_ranked_by_frequency():
    torch.manual_seed(0)
    v, h, n = 40, 16, 30
    decoder = AdaptiveDecoder(h, v, cutoffs=[5, 15])
    counts = torch.randint(0, 100, (v,))
    decoder.set_word_counts(counts)
    ranked = torch.argsort(counts, descending=True, stable=True)
    assert torch.equal(decoder.rank[ranked], torch.arange(v))
    hidden, targets = torch.randn(n, h), torch.randint(v, (n,))
    log_probs = decoder.log_probs(hidden)
    assert torch.allclose(log_probs.logsumexp(1), torch.zeros(n), atol=1e-5)
    want = -log_probs.gather(1, targets[:, None]).mean()
    assert torch.allclose(decoder.loss(hidden, targets), want, atol=1e-6)
    assert "rank" in decoder.state_dict() and decoder.cutoffs == [5, 15]


def test_adaptive_decoder_refuses_clusters_smaller_than_one_unit():
    with pytest.raises(FastlmError, match="nhid"):
        AdaptiveDecoder(8, 40, cutoffs=[5, 15])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_on_cuda_against_plain_pytorch(dtype):
    """fp32: the reference's numbers; bf16: within 2x plain PyTorch's error in the same dtype."""
    hidden, weight, b, targets = (t.cuda() if t is not None else t for t in random_problem(700, 200, 33_278))
    hidden = hidden.detach().mul(0.5).requires_grad_()
    weight, b = weight.detach().requires_grad_(), b.detach().requires_grad_()
    exact = reference(hidden, weight, b, targets)
    exact_grads = torch.autograd.grad(exact, (hidden, weight, b))
    inputs = (hidden, weight, b) if dtype == torch.float32 else bf16_leaves(hidden, weight, b)
    plain = F.cross_entropy(F.linear(*inputs), targets)
    plain_grads = torch.autograd.grad(plain, inputs)
    fused = linear_cross_entropy(*inputs, targets)
    fused_grads = torch.autograd.grad(fused, inputs)
    for f, p, e in zip((fused, *fused_grads), (plain, *plain_grads), (exact, *exact_grads), strict=True):
        bound = FP32_RTOL if dtype == torch.float32 else LOW_PRECISION_FACTOR * relative_error(p.float(), e) + 1e-6
        assert relative_error(f.float(), e.float()) <= bound
