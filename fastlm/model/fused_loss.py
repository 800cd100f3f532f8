"""The decoder and its cross-entropy without the [tokens x vocabulary] tensors.

The example computes logits = h W^T + b for all N = T*B tokens, log_softmax over them, NLL, and in backward
the gradient of both: four [N, V] tensors (93 MB each at batch 20, bptt 35 on Wikitext-2), each one freshly
allocated, page-faulted in and streamed through memory, around the three GEMMs that are the real work.

``linear_cross_entropy`` works through the tokens in chunks instead. For each chunk it forms the logits in
a reused [chunk, V] buffer, their log_softmax and the targets' log-probabilities and, when a gradient will
be needed, the logits' gradient (softmax - onehot) / N and at once the two gradient GEMMs: dh for the
chunk, dW and db accumulated over the chunks. Backward only scales the stored gradients by grad_output
(1 when the loss is backpropagated alone). Forming the gradient in the forward pass, while the chunk is
still in cache, costs three GEMMs; recomputing the logits in backward would cost a fourth, ~25% slower in
all (bench/README.md). The price: a forward under autograd whose loss is never backpropagated does the
gradient work for nothing, so evaluation runs under ``torch.no_grad()``, which skips it.

On CPU the forward GEMM runs in vocabulary blocks: one GEMM writing a [chunk, V] product runs 25-40% slower
on the development CPU than column blocks whose operands stay in cache. On CUDA one chunk holds as many
tokens as a memory budget allows (all of them at the example's sizes) and the GEMMs run whole.

Numbers: per chunk the softmax and its gradient are the example's own ATen kernels (log_softmax, and its
backward given NLL's gradient), so they round as the example's do: with one chunk the gradients are the
example's bit for bit wherever the GEMMs are; with several, dW is summed over chunks in another order
(float noise). In bf16 (hidden and weight both bf16: fastlm.step.low_precision) the GEMMs run in bf16 with
fp32 accumulation, and log_softmax, its gradient and the accumulation of dW over chunks stay in fp32.

Profiler phases: the GEMMs (forward and gradient) are timed as ``decoder``; log_softmax, the targets'
log-probabilities and the logits' gradient as ``loss``, chunk by chunk (the timer sums a phase's pieces per
step). The decoder's gradient GEMMs thus show inside the forward phase.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from fastlm.timing import DECODER, LOSS, phase

# Chosen by measurement on the 2-core development CPU (bench/README.md, "decoder chunking").
CPU_CHUNK_TOKENS = 192
CPU_VOCAB_BLOCK = 2048
CUDA_CHUNK_BYTES = 1 << 30  # on CUDA a chunk's fp32 logits may take up to 1 GiB


@dataclass(frozen=True)
class Chunking:
    tokens: int  # tokens per chunk
    vocab_block: Optional[int]  # columns per forward GEMM call; None: the whole vocabulary at once


def default_chunking(device: torch.device, num_tokens: int, vocab_size: int) -> Chunking:
    if torch.device(device).type == "cuda":
        tokens = max(1, min(num_tokens, CUDA_CHUNK_BYTES // (4 * vocab_size)))
        return Chunking(tokens, None)
    return Chunking(min(num_tokens, CPU_CHUNK_TOKENS), CPU_VOCAB_BLOCK)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         targets: torch.Tensor, chunking: Optional[Chunking] = None) -> torch.Tensor:
    """mean over tokens of -log_softmax(hidden @ weight.T + bias)[target]: cross_entropy(linear(...), targets).

    hidden [N, H], weight [V, H], bias [V] or None, targets [N] (int64). Differentiable in hidden, weight
    and bias; with tied weights (weight is also the embedding's) autograd adds up both uses as usual.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, H] and weight [V, H] expected, got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets [N] expected for hidden {tuple(hidden.shape)}, got {tuple(targets.shape)}")
    tensors = (hidden, weight) + ((bias,) if bias is not None else ())
    if any(t.dtype != hidden.dtype for t in tensors):
        raise ValueError(f"hidden, weight and bias must share one dtype, got {[str(t.dtype) for t in tensors]}")
    chunking = chunking or default_chunking(hidden.device, hidden.shape[0], weight.shape[0])
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _FusedLinearCrossEntropy.apply(hidden, weight, bias, targets, chunking)
    loss, _ = _chunked_pass(hidden, weight, bias, targets, chunking, want_grad=False)
    return loss


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunking):
        loss, grads = _chunked_pass(hidden, weight, bias, targets, chunking, want_grad=True)
        ctx.grads = grads
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        grads = ctx.grads
        ctx.grads = None
        # grad_loss is 1 when the loss is backpropagated alone. On CPU reading it costs nothing and saves a
        # pass over dW; on CUDA reading it would synchronise with the host, so the scaling always runs.
        if grad_loss.device.type != "cpu" or grad_loss.item() != 1.0:
            grads = tuple(g.mul_(grad_loss) if g is not None else None for g in grads)
        d_hidden, d_weight, d_bias = (g if needed else None for g, needed in zip(grads, ctx.needs_input_grad))
        return d_hidden, d_weight, d_bias, None, None


def _chunked_pass(hidden, weight, bias, targets, chunking: Chunking, want_grad: bool):
    """(mean loss, (d_hidden, d_weight, d_bias) for a loss gradient of 1, or None); see the module doc.

    Per chunk the softmax and its gradient are the very ATen kernels the example runs (log_softmax, its
    backward given NLL's gradient), so they round as the example does; only the GEMMs' split over chunks
    and vocabulary blocks changes summation order.
    """
    num_tokens, vocab = hidden.shape[0], weight.shape[0]
    device = hidden.device
    h, w, b = hidden, weight, bias
    compute_dtype = hidden.dtype
    rows = min(chunking.tokens, num_tokens)
    losses = torch.empty(num_tokens, device=device, dtype=torch.float32)
    # On CPU one buffer holds a chunk's logits, then (in place) their log-probabilities, then their gradient,
    # so that it stays in cache: both kernels are elementwise in their output once a row's max and sums are
    # read (the tests check it). Elsewhere the log-probabilities get a buffer of their own.
    logits = torch.empty(rows, vocab, device=device, dtype=torch.float32)
    log_prob_buffer = logits if device.type == "cpu" else torch.empty_like(logits)
    low_precision = compute_dtype != torch.float32
    # In low precision the GEMMs read and write a buffer of their own dtype next to the fp32 one.
    product = torch.empty_like(logits, dtype=compute_dtype) if low_precision else logits
    if want_grad:
        d_hidden = torch.empty(num_tokens, hidden.shape[1], device=device, dtype=torch.float32)
        d_weight = torch.empty(vocab, weight.shape[1], device=device, dtype=torch.float32)
        d_bias = torch.zeros(vocab, device=device, dtype=torch.float32) if bias is not None else None
        # NLL's gradient: -1/N at each token's target, 0 elsewhere; the zeros are written once and the
        # targets' entries set and cleared per chunk.
        nll_grad = torch.zeros_like(logits)
        minus_inv_n = torch.full((rows, 1), -1.0 / num_tokens, device=device)
    for start in range(0, num_tokens, chunking.tokens):
        end = min(start + chunking.tokens, num_tokens)
        n, h_chunk, target_index = end - start, h[start:end], targets[start:end, None]
        chunk_logits = logits[:n]
        with phase(DECODER):
            _logits_into(product[:n], h_chunk, w, b, chunking.vocab_block)
        with phase(LOSS):
            if low_precision:
                chunk_logits.copy_(product[:n])
            log_probs = torch._log_softmax(chunk_logits, 1, False, out=log_prob_buffer[:n])
            torch.neg(log_probs.gather(1, target_index).squeeze(1), out=losses[start:end])
            if want_grad:
                chunk_nll_grad = nll_grad[:n].scatter_(1, target_index, minus_inv_n[:n])
                grad_logits = torch._log_softmax_backward_data(chunk_nll_grad, log_probs, 1, torch.float32,
                                                               out=chunk_logits)
                chunk_nll_grad.scatter_(1, target_index, 0.0)
                if d_bias is not None:
                    d_bias += grad_logits.sum(0)
                if low_precision:
                    grad_logits = product[:n].copy_(grad_logits)
        if want_grad:
            with phase(DECODER):
                _accumulate_gradients(grad_logits, h_chunk, w, d_hidden[start:end], d_weight, first=start == 0)
    loss = losses.mean()
    if not want_grad:
        return loss, None
    return loss, (d_hidden.to(hidden.dtype), d_weight.to(weight.dtype),
                  d_bias.to(bias.dtype) if d_bias is not None else None)


def _accumulate_gradients(grad_logits, h_chunk, w, d_hidden_chunk, d_weight, first: bool) -> None:
    """d_hidden_chunk = grad_logits @ w; d_weight (+)= grad_logits.T @ h_chunk, accumulated in fp32."""
    if grad_logits.dtype == torch.float32:
        torch.mm(grad_logits, w, out=d_hidden_chunk)
        if first:
            torch.mm(grad_logits.t(), h_chunk, out=d_weight)
        else:
            d_weight.addmm_(grad_logits.t(), h_chunk)
        return
    d_hidden_chunk.copy_(torch.mm(grad_logits, w))
    chunk_d_weight = torch.mm(grad_logits.t(), h_chunk)
    if first:
        d_weight.copy_(chunk_d_weight)
    else:
        d_weight.add_(chunk_d_weight)


def _logits_into(out: torch.Tensor, h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor],
                 vocab_block: Optional[int]) -> None:
    """out [n, V] = h @ w.T + b, in column blocks of ``vocab_block`` (None: one GEMM)."""
    vocab = w.shape[0]
    block = vocab_block or vocab
    for lo in range(0, vocab, block):
        hi = min(lo + block, vocab)
        if b is None:
            torch.mm(h, w[lo:hi].t(), out=out[:, lo:hi])
        else:
            torch.addmm(b[lo:hi], h, w[lo:hi].t(), out=out[:, lo:hi])
