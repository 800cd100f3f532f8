"""The decoder and its cross-entropy without the [tokens x vocabulary] tensors of the example.

``linear_cross_entropy(hidden [N, H], weight [V, H], bias [V] or None, targets [N] int64)`` is the mean over
tokens of ``cross_entropy(linear(hidden, weight, bias), targets)``, differentiable in hidden, weight and bias.
Where the example makes four [N, V] tensors (93 MB each at batch 20, bptt 35 on Wikitext-2), this goes through
the tokens in chunks: per chunk the logits, their log_softmax, the targets' log-probabilities and, when a
gradient will be needed, the logits' gradient (softmax - onehot) / N and the gradient GEMMs, while the chunk
is in cache. Backward only scales the stored gradients by grad_output, so a forward under autograd whose
loss is never backpropagated does the gradient work for nothing: evaluation runs under ``torch.no_grad()``.
(Recomputing the logits in backward instead costs a fourth GEMM: bench/README.md, "Decoder chunking".)

``compute_dtype`` is what the GEMMs run in: fp32 (exact, the example's own ATen softmax kernels) or bf16
(fp32 accumulation; softmax, loss and the logits' gradient in fp32 through ``softmax_xent_rows`` of
fastlm.model.cpu_kernels, dh and dW summed and kept in fp32 by its ``gemm_f32_out``); the gradients come back
in the inputs' dtypes. What rounds where, and why the bf16 dW is one GEMM per group of chunks: docs/semantics.md,
"The fused decoder and loss". Chunk sizes are chosen per machine (fastlm.model.loss_chunks). Profiler phases: the GEMMs (forward and gradient) are ``decoder``, the
softmax and the logits' gradient ``loss``; so the decoder's gradient GEMMs show inside the forward phase.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from fastlm.model.cpu_kernels import gemm_f32_out, native_applies, softmax_xent_rows, softmax_xent_rows_torch
from fastlm.model.loss_chunks import Chunking, choose_chunking
from fastlm.timing import DECODER, LOSS, phase

LOW_PRECISION_GROUP_BYTES = 256 << 20  # the bf16 gradients of one dW GEMM's tokens
_CPU_WORKSPACE: dict = {}  # (name, dtype) -> a flat scratch buffer kept from call to call (see _scratch)


def _scratch(name: str, rows: int, columns: int, dtype: torch.dtype, device: torch.device,
             zeros: bool = False) -> torch.Tensor:
    """A [rows, columns] scratch buffer. On CPU it is kept from call to call: a buffer of tens of MB freed
    and allocated again every step is handed back to the OS and page-faulted in anew each time. Elsewhere
    (CUDA's caching allocator already reuses memory, and a buffer kept across CUDA graph captures would not be
    safe) a fresh one. ``zeros`` buffers must be left zero by their user."""
    if device.type != "cpu":
        return (torch.zeros if zeros else torch.empty)(rows, columns, device=device, dtype=dtype)
    key = (name, dtype)
    flat = _CPU_WORKSPACE.get(key)
    if flat is None or flat.numel() < rows * columns:
        flat = (torch.zeros if zeros else torch.empty)(rows * columns, dtype=dtype)
        _CPU_WORKSPACE[key] = flat
    return flat[:rows * columns].view(rows, columns)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         targets: torch.Tensor, chunking: Optional[Chunking] = None,
                         compute_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """mean over tokens of -log_softmax(hidden @ weight.T + bias)[target]: cross_entropy(linear(...), targets).

    hidden [N, H], weight [V, H], bias [V] or None, targets [N] (int64). Differentiable in hidden, weight
    and bias; with tied weights (weight is also the embedding's) autograd adds up both uses as usual.
    ``compute_dtype`` (default: the inputs' dtype) is what the GEMMs run in (see the module doc); the
    gradients come back in the inputs' dtypes. ``chunking`` None: the machine's choice (loss_chunks).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, H] and weight [V, H] expected, got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets [N] expected for hidden {tuple(hidden.shape)}, got {tuple(targets.shape)}")
    tensors = (hidden, weight) + ((bias,) if bias is not None else ())
    if any(t.dtype != hidden.dtype for t in tensors):
        raise ValueError(f"hidden, weight and bias must share one dtype, got {[str(t.dtype) for t in tensors]}")
    compute_dtype = compute_dtype or hidden.dtype
    if chunking is None:
        chunking = choose_chunking(hidden.device, hidden.shape[0], hidden.shape[1], weight.shape[0], compute_dtype,
                                   lambda c: _chunked_pass(hidden.detach(), weight.detach(),
                                                           bias.detach() if bias is not None else None, targets, c,
                                                           compute_dtype, want_grad=True))
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _FusedLinearCrossEntropy.apply(hidden, weight, bias, targets, chunking, compute_dtype)
    loss, _ = _chunked_pass(hidden, weight, bias, targets, chunking, compute_dtype, want_grad=False)
    return loss


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunking, compute_dtype):
        loss, grads = _chunked_pass(hidden, weight, bias, targets, chunking, compute_dtype, want_grad=True)
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
        return d_hidden, d_weight, d_bias, None, None, None


def _chunked_pass(hidden, weight, bias, targets, chunking: Chunking, compute_dtype: torch.dtype, want_grad: bool):
    """(mean loss, (d_hidden, d_weight, d_bias) for a loss gradient of 1, or None); see the module doc."""
    try:
        if compute_dtype == torch.float32 and hidden.dtype == torch.float32:
            return _exact_pass(hidden, weight, bias, targets, chunking, want_grad)
        return _low_precision_pass(hidden, weight, bias, targets, chunking, compute_dtype, want_grad)
    except BaseException:
        _CPU_WORKSPACE.clear()  # an interrupted pass may have left a zeros buffer dirty
        raise


def _exact_pass(hidden, weight, bias, targets, chunking: Chunking, want_grad: bool):
    """fp32 throughout; per chunk the softmax and its gradient are the very ATen kernels the example runs
    (log_softmax, its backward given NLL's gradient), so they round as the example does; only the GEMMs'
    split over chunks and vocabulary blocks changes summation order."""
    num_tokens, vocab = hidden.shape[0], weight.shape[0]
    device = hidden.device
    h, w, b = hidden, weight, bias
    rows = min(chunking.tokens, num_tokens)
    losses = torch.empty(num_tokens, device=device, dtype=torch.float32)
    # On CPU one buffer holds a chunk's logits, then (in place) their log-probabilities, then their gradient,
    # so that it stays in cache: both kernels are elementwise in their output once a row's max and sums are
    # read (the tests check it). Elsewhere the log-probabilities get a buffer of their own.
    logits = _scratch("logits", rows, vocab, torch.float32, device)
    log_prob_buffer = logits if device.type == "cpu" else torch.empty_like(logits)
    if want_grad:
        d_hidden = torch.empty(num_tokens, hidden.shape[1], device=device, dtype=torch.float32)
        d_weight = torch.empty(vocab, weight.shape[1], device=device, dtype=torch.float32)
        d_bias = torch.zeros(vocab, device=device, dtype=torch.float32) if bias is not None else None
        # NLL's gradient: -1/N at each token's target, 0 elsewhere; the zeros are written once and the
        # targets' entries set and cleared per chunk.
        nll_grad = _scratch("nll_grad", rows, vocab, torch.float32, device, zeros=True)
        minus_inv_n = torch.full((rows, 1), -1.0 / num_tokens, device=device)
    for start in range(0, num_tokens, chunking.tokens):
        end = min(start + chunking.tokens, num_tokens)
        n, h_chunk, target_index = end - start, h[start:end], targets[start:end, None]
        chunk_logits = logits[:n]
        with phase(DECODER):
            _logits_into(chunk_logits, h_chunk, w, b, chunking.vocab_block)
        with phase(LOSS):
            log_probs = torch._log_softmax(chunk_logits, 1, False, out=log_prob_buffer[:n])
            torch.neg(log_probs.gather(1, target_index).squeeze(1), out=losses[start:end])
            if want_grad:
                chunk_nll_grad = nll_grad[:n].scatter_(1, target_index, minus_inv_n[:n])
                grad_logits = torch._log_softmax_backward_data(chunk_nll_grad, log_probs, 1, torch.float32,
                                                               out=chunk_logits)
                chunk_nll_grad.scatter_(1, target_index, 0.0)
                if d_bias is not None:
                    d_bias += grad_logits.sum(0)
        if want_grad:
            with phase(DECODER):
                torch.mm(grad_logits, w, out=d_hidden[start:end])
                if start == 0:
                    torch.mm(grad_logits.t(), h_chunk, out=d_weight)
                else:
                    d_weight.addmm_(grad_logits.t(), h_chunk)
    loss = losses.mean()
    return (loss, (d_hidden, d_weight, d_bias)) if want_grad else (loss, None)


def _low_precision_pass(hidden, weight, bias, targets, chunking: Chunking, dtype: torch.dtype, want_grad: bool):
    """GEMMs in ``dtype`` (bf16) with fp32 accumulation, softmax and its gradient in fp32 (docs/semantics.md).
    Without ``want_grad`` the gradient is still formed per chunk (by the same row kernel) and dropped."""
    num_tokens, vocab, width = hidden.shape[0], weight.shape[0], hidden.shape[1]
    device = hidden.device
    with phase(DECODER):
        h, w = hidden.to(dtype), weight.to(dtype)
    bias32 = bias.float() if bias is not None else None
    rows = min(chunking.tokens, num_tokens)
    element = torch.finfo(dtype).bits // 8
    group = num_tokens if want_grad else rows
    group = max(rows, min(group, LOW_PRECISION_GROUP_BYTES // (vocab * element)))
    products = _scratch("products", group, vocab, dtype, device)
    losses = torch.empty(num_tokens, device=device, dtype=torch.float32)
    d_hidden = torch.empty(num_tokens, width, device=device, dtype=torch.float32) if want_grad else None
    d_weight = torch.empty(vocab, width, device=device, dtype=torch.float32) if want_grad else None  # group 1 sets it
    d_bias = torch.zeros(vocab, device=device, dtype=torch.float32) if want_grad and bias is not None else None
    native = native_applies(products)
    if not native:  # the PyTorch twin's fp32 buffers: the chunk's logits, and NLL's gradient (kept zero)
        logits = _scratch("logits", rows, vocab, torch.float32, device)
        nll_grad = _scratch("nll_grad", rows, vocab, torch.float32, device, zeros=True)
    scale = 1.0 / num_tokens
    for group_start in range(0, num_tokens, group):
        group_end = min(group_start + group, num_tokens)
        for start in range(group_start, group_end, chunking.tokens):
            end = min(start + chunking.tokens, group_end)
            product = products[start - group_start:end - group_start]
            with phase(DECODER):
                _logits_into(product, h[start:end], w, None, chunking.vocab_block)
            with phase(LOSS):
                chunk_targets = targets[start:end]
                if native:
                    softmax_xent_rows(product, bias32, chunk_targets, scale, losses[start:end], d_bias)
                else:
                    n = end - start
                    softmax_xent_rows_torch(product, bias32, chunk_targets, scale, losses[start:end], d_bias,
                                            logits[:n], nll_grad[:n])
        if want_grad:  # the group's gradient GEMMs, on its chunks' bf16 gradients in ``products``
            with phase(DECODER):
                grads = products[:group_end - group_start]
                gemm_f32_out(grads, w, d_hidden[group_start:group_end])
                gemm_f32_out(grads.t(), h[group_start:group_end], d_weight, accumulate=group_start > 0)
    loss = losses.mean()
    if not want_grad:
        return loss, None
    return loss, (d_hidden.to(hidden.dtype), d_weight.to(weight.dtype),
                  d_bias.to(bias.dtype) if d_bias is not None else None)


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
