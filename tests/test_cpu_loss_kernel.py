"""The native CPU loss kernel against its PyTorch twin, the bf16 fused loss through either, and the chunk tuner."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fastlm.device as device
import fastlm.model.cpu_kernels as cpu_kernels
import fastlm.model.loss_chunks as loss_chunks
from fastlm.model.fused_loss import linear_cross_entropy
from fastlm.model.loss_chunks import Chunking, ChunkTuner
from tests.tolerances import LOW_PRECISION_FACTOR

REPO_ROOT = Path(__file__).resolve().parents[1]
needs_kernel = pytest.mark.skipif(cpu_kernels.native_kernel() is None,
                                  reason=f"native kernel missing: {cpu_kernels.native_missing_reason()}")


def chunk(n, vocab, seed=0, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    product = (torch.randn(n, vocab, generator=g) * spread).bfloat16()
    bias = torch.randn(vocab, generator=g)
    targets = torch.randint(vocab, (n,), generator=g)
    return product, bias, targets


@needs_kernel
@pytest.mark.parametrize("n, vocab, with_bias", [(1, 1, True), (7, 33, True), (5, 1000, False), (64, 4097, True)])
def test_native_rows_match_the_pytorch_twin(n, vocab, with_bias):
    product, bias, targets = chunk(n, vocab)
    bias = bias if with_bias else None
    outputs = {}
    for name in ("native", "twin"):
        p, losses = product.clone(), torch.empty(n)
        d_bias = torch.zeros(vocab) if with_bias else None
        if name == "native":
            cpu_kernels.softmax_xent_rows(p, bias, targets, 0.25, losses, d_bias)
        else:
            cpu_kernels.softmax_xent_rows_torch(p, bias, targets, 0.25, losses, d_bias, torch.empty(n, vocab),
                                                torch.zeros(n, vocab))
        outputs[name] = (p, losses, d_bias)
    (p, losses, d_bias), (tp, tlosses, td_bias) = outputs["native"], outputs["twin"]
    # The loss in fp32 within a few ulps of log(V)-sized values; the bf16 gradient within one bf16 rounding
    # (unit roundoff 2^-8) of the twin's; the bias gradient (fp32 sums) within fp32 noise.
    torch.testing.assert_close(losses, tlosses, rtol=1e-6, atol=1e-5)
    scale = tp.float().abs().max().item()
    torch.testing.assert_close(p.float(), tp.float(), rtol=2.0 ** -8, atol=2.0 ** -8 * scale * 1e-3)
    if with_bias:
        torch.testing.assert_close(d_bias, td_bias, rtol=1e-5, atol=1e-7)
    # and both are the cross-entropy of the bf16 logits plus the bias, computed plainly
    logits = product.float() + (bias if bias is not None else 0)
    torch.testing.assert_close(losses, F.cross_entropy(logits, targets, reduction="none"), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_native_rows_keep_a_nan_loss_nan():
    product, bias, targets = chunk(3, 50)
    product[1, 7] = float("nan")
    losses = torch.empty(3)
    cpu_kernels.softmax_xent_rows(product, bias, targets, 1.0, losses, None)
    assert torch.isnan(losses[1]) and torch.isfinite(losses[[0, 2]]).all()


def problem(n=37, width=8, vocab=300, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, width, generator=g, requires_grad=True),
            (torch.randn(vocab, width, generator=g) * 0.3).requires_grad_(),
            torch.randn(vocab, generator=g, requires_grad=True), torch.randint(vocab, (n,), generator=g))


def bf16_loss_and_grads(chunking, native: bool, monkeypatch):
    if not native:
        monkeypatch.setattr(cpu_kernels, "native_applies", lambda product: False)
        monkeypatch.setattr("fastlm.model.fused_loss.native_applies", lambda product: False)
    hidden, weight, bias, targets = problem()
    loss = linear_cross_entropy(hidden, weight, bias, targets, chunking, compute_dtype=torch.bfloat16)
    return loss, torch.autograd.grad(loss, (hidden, weight, bias))


@pytest.mark.parametrize("chunking", [Chunking(10, None), Chunking(64, 128), Chunking(16, 7)])
def test_bf16_fused_loss_is_within_twice_plain_pytorchs_bf16_error(chunking, monkeypatch):
    """fp32 inputs, bf16 GEMMs: loss and fp32 gradients against the exact fp32 reference, within 2x the error
    of plain PyTorch computing the same in bf16 (autocast's way: bf16 product, fp32 softmax)."""
    hidden, weight, bias, targets = problem()
    exact = F.cross_entropy(F.linear(hidden, weight, bias), targets)
    exact_grads = torch.autograd.grad(exact, (hidden, weight, bias))
    plain = F.cross_entropy(F.linear(hidden.bfloat16(), weight.bfloat16()).float() + bias, targets)
    plain_grads = torch.autograd.grad(plain, (hidden, weight, bias))
    loss, grads = bf16_loss_and_grads(chunking, cpu_kernels.native_kernel() is not None, monkeypatch)
    assert loss.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    assert abs(loss - exact) <= LOW_PRECISION_FACTOR * abs(plain - exact) + 1e-6
    for got, p, e in zip(grads, plain_grads, exact_grads, strict=True):
        assert (got - e).norm() <= LOW_PRECISION_FACTOR * (p - e).norm() + 1e-7


def test_bf16_gradients_are_the_same_in_one_group_or_several(monkeypatch):
    """dh and dW GEMMs once per group of chunks: several groups (a small LOW_PRECISION_GROUP_BYTES) give the one
    group's gradients up to fp32 summation order; the first group sets dW, the others add to it."""
    import fastlm.model.fused_loss as fused_loss

    one_loss, one_grads = bf16_loss_and_grads(Chunking(8, None), True, monkeypatch)
    monkeypatch.setattr(fused_loss, "LOW_PRECISION_GROUP_BYTES", 8 * 300 * 2)  # 8 tokens' bf16 rows: 5 groups
    several_loss, several_grads = bf16_loss_and_grads(Chunking(8, None), True, monkeypatch)
    torch.testing.assert_close(several_loss, one_loss, rtol=0, atol=0)
    for a, b in zip(several_grads, one_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@needs_kernel
def test_bf16_fused_loss_native_and_twin_agree(monkeypatch):
    native_loss, native_grads = bf16_loss_and_grads(Chunking(16, None), True, monkeypatch)
    twin_loss, twin_grads = bf16_loss_and_grads(Chunking(16, None), False, monkeypatch)
    torch.testing.assert_close(native_loss, twin_loss, rtol=1e-6, atol=1e-6)
    for a, b in zip(native_grads, twin_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=2.0 ** -7, atol=2.0 ** -8 * b.abs().max().item())


needs_gemm = pytest.mark.skipif(cpu_kernels.native_gemm_reason() is not None,
                                reason=f"native GEMM not run here: {cpu_kernels.native_gemm_reason()}")
GEMM_SHAPES = [(1, 1, 1), (3, 5, 7), (9, 33, 17), (37, 64, 200), (130, 3, 48), (700, 1001, 200), (64, 700, 33),
               (37, 700, 2051), (9, 64, 1500)]  # the last two: several column panels (n wide), K blocks


def _operand(rows, columns, transposed, generator):
    """A bf16 [rows, columns] operand, row-major or a transposed view of a column-major one."""
    if transposed:
        return torch.randn(columns, rows, generator=generator).bfloat16().t()
    return torch.randn(rows, columns, generator=generator).bfloat16()


@needs_gemm
@pytest.mark.parametrize("m, k, n", GEMM_SHAPES)
@pytest.mark.parametrize("a_transposed, b_transposed", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("accumulate", [False, True])
def test_native_gemm_is_the_exact_products_summed_in_fp32(m, k, n, a_transposed, b_transposed, accumulate):
    """Odd k (a last half pair), n not a multiple of 16, m not of 8, both operand layouts the fused loss passes
    (dh: rows contiguous; dW: the transposed gradient), and accumulation into C."""
    g = torch.Generator().manual_seed(m * 1000 + k * 10 + n)
    a, b = _operand(m, k, a_transposed, g), _operand(k, n, b_transposed, g)
    start = torch.randn(m, n, generator=g)
    out = start.clone()
    cpu_kernels.gemm_f32_out(a, b, out, accumulate=accumulate)
    exact = a.double() @ b.double() + (start.double() if accumulate else 0)
    # fp32 sums of exact products: within k fp32 roundings of the sum of magnitudes, never a bf16 rounding
    magnitude = a.double().abs() @ b.double().abs() + (start.double().abs() if accumulate else 0)
    assert ((out.double() - exact).abs() <= 2.0 ** -24 * (k + 2) * magnitude + 1e-30).all()


@needs_gemm
def test_native_gemm_writes_only_its_columns_of_a_wider_output():
    a, b = torch.randn(20, 30).bfloat16(), torch.randn(30, 10).bfloat16()
    wide = torch.full((20, 16), 7.0)
    cpu_kernels.gemm_f32_out(a, b, wide[:, :10])
    torch.testing.assert_close(wide[:, :10], a.float() @ b.float(), rtol=1e-5, atol=1e-5)
    assert (wide[:, 10:] == 7.0).all()


@needs_kernel
@pytest.mark.parametrize("threads", [1, 3])
def test_the_kernels_split_over_any_number_of_threads_like_over_two(threads):
    """The kernels run their shares on OpenMP's pool (kernels/cpu/threads.h): rows of the loss and of the GEMM
    are computed alike whatever the team, so only d_bias (one fp32 sum per thread, added in order) may differ."""
    product, bias, targets = chunk(37, 2051, seed=3)
    a, b = torch.randn(37, 200).bfloat16(), torch.randn(200, 2051).bfloat16()
    runs = {}
    before = torch.get_num_threads()
    for count in (2, threads):
        torch.set_num_threads(count)
        try:
            p, losses, d_bias = product.clone(), torch.empty(37), torch.zeros(2051)
            cpu_kernels.softmax_xent_rows(p, bias, targets, 0.5, losses, d_bias)
            out = torch.empty(37, 2051)
            cpu_kernels.gemm_f32_out(a, b, out)
            runs[count] = (p, losses, d_bias, out)
        finally:
            torch.set_num_threads(before)
    (p2, losses2, d_bias2, out2), (p, losses, d_bias, out) = runs[2], runs[threads]
    assert torch.equal(p, p2) and torch.equal(losses, losses2) and torch.equal(out, out2)
    torch.testing.assert_close(d_bias, d_bias2, rtol=1e-6, atol=1e-8)


@needs_kernel
def test_a_smaller_openmp_team_than_asked_still_does_every_share(tmp_path):
    """Under OMP_THREAD_LIMIT=1 torch still asks for 2 threads and OpenMP gives a team of 1: that one thread
    must do both shares (in a subprocess, since the limit is read once per process)."""
    script = tmp_path / "limited.py"
    script.write_text(
        "import sys, torch\n"
        "import fastlm.model.cpu_kernels as k\n"
        "torch.set_num_threads(2)\n"
        "g = torch.Generator().manual_seed(5)\n"
        "product = (torch.randn(40, 3001, generator=g) * 3).bfloat16()\n"
        "targets = torch.randint(3001, (40,), generator=g)\n"
        "a, b = torch.randn(40, 64, generator=g).bfloat16(), torch.randn(64, 3001, generator=g).bfloat16()\n"
        "losses, out = torch.empty(40), torch.empty(40, 3001)\n"
        "k.softmax_xent_rows(product, None, targets, 1.0, losses, None)\n"
        "k.gemm_f32_out(a, b, out)\n"
        "torch.save((product, losses, out, a, b, targets), sys.argv[1])\n")
    saved = tmp_path / "out.pt"
    env = dict(os.environ, OMP_THREAD_LIMIT="1")
    subprocess.run([sys.executable, str(script), str(saved)], env=env, check=True, cwd=REPO_ROOT)
    product, losses, out, a, b, targets = torch.load(saved)
    g = torch.Generator().manual_seed(5)
    original = (torch.randn(40, 3001, generator=g) * 3).bfloat16()
    torch.testing.assert_close(losses, F.cross_entropy(original.float(), targets, reduction="none"),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(product.float(), (F.softmax(original.float(), 1) - F.one_hot(targets, 3001)),
                               rtol=2.0 ** -8, atol=1e-6)
    torch.testing.assert_close(out, a.float() @ b.float(), rtol=1e-5, atol=1e-4)


def test_gemm_without_the_native_kernel_is_torchs_fp32_gemm_on_the_bf16_operands(monkeypatch):
    """The fallback (no AVX512-BF16, no build): the same products and sums, by torch's fp32 GEMM."""
    monkeypatch.setattr(cpu_kernels, "native_gemm_reason", lambda: "not here")
    a, b = torch.randn(37, 301).bfloat16(), torch.randn(301, 45).bfloat16()
    out = torch.ones(37, 45)
    cpu_kernels.gemm_f32_out(a, b, out, accumulate=True)
    torch.testing.assert_close(out, torch.ones(37, 45).addmm_(a.float(), b.float()), rtol=0, atol=0)
    cpu_kernels.gemm_f32_out(a, b, out)
    torch.testing.assert_close(out, a.float() @ b.float(), rtol=0, atol=0)


def test_native_gemm_reason_names_what_is_missing(monkeypatch):
    monkeypatch.setenv(cpu_kernels.DISABLE_VARIABLE, "0")
    cpu_kernels._load.cache_clear()
    try:
        assert "FASTLM_NATIVE_CPU=0" in cpu_kernels.native_gemm_reason()
    finally:
        monkeypatch.delenv(cpu_kernels.DISABLE_VARIABLE)
        cpu_kernels._load.cache_clear()


def test_a_missing_kernel_says_why(monkeypatch):
    monkeypatch.setenv(cpu_kernels.DISABLE_VARIABLE, "0")
    cpu_kernels._load.cache_clear()
    try:
        assert cpu_kernels.native_kernel() is None
        assert "FASTLM_NATIVE_CPU=0" in cpu_kernels.native_missing_reason()
        assert not cpu_kernels.native_applies(torch.zeros(2, 3, dtype=torch.bfloat16))
    finally:
        monkeypatch.delenv(cpu_kernels.DISABLE_VARIABLE)
        cpu_kernels._load.cache_clear()


def test_the_tuner_keeps_the_fastest_split_and_remembers_it_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv(loss_chunks.TUNE_VARIABLE, "1")
    monkeypatch.setattr(device.OtherWork, "busy", lambda self: None)
    timings = {Chunking(128, None): 0.001}  # the fastest; every other candidate sleeps longer

    def measure(chunking):
        import time

        time.sleep(timings.get(chunking, 0.004))

    tuner = ChunkTuner(tmp_path)
    chosen = tuner.choose(torch.device("cpu"), 700, 200, 33_278, torch.bfloat16, measure)
    assert chosen == Chunking(128, None)
    stored = json.loads(tuner.cache_file().read_text())
    assert [e["chunking"] for e in stored["entries"].values()] == [{"tokens": 128, "vocab_block": None}]
    # A new process (a new tuner) reads the choice back without timing anything.
    calls = []
    again = ChunkTuner(tmp_path).choose(torch.device("cpu"), 700, 200, 33_278, torch.bfloat16, calls.append)
    assert again == chosen and calls == []


def test_a_split_timed_under_load_is_used_but_not_remembered(tmp_path, monkeypatch):
    monkeypatch.setenv(loss_chunks.TUNE_VARIABLE, "1")
    monkeypatch.setattr(device.OtherWork, "busy", lambda self: "other processes used 1.5 of 2 cores")
    calls = []
    tuner = ChunkTuner(tmp_path)
    chosen = tuner.choose(torch.device("cpu"), 700, 200, 33_278, torch.bfloat16, calls.append)
    timed = len(calls)
    assert timed > 0 and not tuner.cache_file().exists()
    assert tuner.choose(torch.device("cpu"), 700, 200, 33_278, torch.bfloat16, calls.append) == chosen
    assert len(calls) == timed  # this process keeps its choice
    ChunkTuner(tmp_path).choose(torch.device("cpu"), 700, 200, 33_278, torch.bfloat16, calls.append)
    assert len(calls) == 2 * timed  # the next process times the candidates again


def test_the_tuner_leaves_small_shapes_evaluation_and_cuda_on_the_heuristic(tmp_path, monkeypatch):
    monkeypatch.setenv(loss_chunks.TUNE_VARIABLE, "1")
    tuner, calls = ChunkTuner(tmp_path), []
    assert tuner.choose("cpu", 50, 8, 300, torch.float32, calls.append) == loss_chunks.default_chunking("cpu", 50, 300)
    with torch.no_grad():
        assert tuner.choose("cpu", 700, 200, 33_278, torch.float32, calls.append).tokens == loss_chunks.CPU_CHUNK_TOKENS
    assert tuner.choose("cuda", 700, 200, 33_278, torch.float32, calls.append) == Chunking(700, None)
    monkeypatch.setenv(loss_chunks.TUNE_VARIABLE, "0")
    assert tuner.choose("cpu", 700, 200, 33_278, torch.float32, calls.append).tokens == loss_chunks.CPU_CHUNK_TOKENS
    assert calls == []


@pytest.mark.parametrize("old_text", ["{not json", json.dumps({"format": 1, "machine": "x", "entries": {}})])
def test_an_unreadable_or_older_tuning_file_is_tuned_again_with_one_warning(tmp_path, monkeypatch, caplog, old_text):
    monkeypatch.setenv(loss_chunks.TUNE_VARIABLE, "1")
    monkeypatch.setattr(device.OtherWork, "busy", lambda self: None)
    tuner = ChunkTuner(tmp_path)
    tuner.cache_file().parent.mkdir(parents=True)
    tuner.cache_file().write_text(old_text)
    calls = []
    with caplog.at_level("WARNING", logger=loss_chunks.__name__):
        tuner.choose("cpu", 700, 200, 33_278, torch.bfloat16, calls.append)
    assert calls  # timed, and the file is valid again
    assert json.loads(tuner.cache_file().read_text())["format"] == loss_chunks.FORMAT
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [f"loss chunks: ignoring {tuner.cache_file()}"]


def test_the_decoder_gemm_bench_times_all_three_gemms_both_ways_where_it_can():
    """bench/decoder_gemms.py, the check to run on an AMX CPU before changing which GEMM dh and dW use."""
    done = subprocess.run([sys.executable, "bench/decoder_gemms.py", "--tokens", "24", "--hidden", "16",
                           "--vocab", "300", "--repeat", "2"], cwd=REPO_ROOT, capture_output=True, text=True,
                          check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert [row["gemm"] for row in result["gemms"]] == ["logits", "dh", "dW"]
    native_here = cpu_kernels.native_gemm_reason() is None
    for row in result["gemms"]:
        assert row["torch_bf16_out_ms"] > 0
        assert (row["native_fp32_out_ms"] is not None and row["native_fp32_out_ms"] > 0) == native_here
