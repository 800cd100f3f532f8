"""Training on a streamed corpus (--data-mode stream) is training on the same corpus in memory, step for step."""

import json

import pytest
import torch

from fastlm.data import Corpus, StreamedCorpus, generated_corpus, resolve_corpus
from fastlm.data.stream import stream_in_memory
from fastlm.train.run_folder import RunFolder
from fastlm.train.trainer import Trainer
from tests.helpers import one_line_error, quiet_display, run_cli, small_config, toy_corpus, write_corpus_folder


def losses_of(corpus, config, folder):
    steps = []
    trainer = Trainer(config, corpus, torch.device("cpu"), quiet_display(),
                      on_step=lambda step, loss: steps.append(float(loss)))
    result = trainer.fit(RunFolder(folder))
    return steps, result.best_val_loss, result.test_loss


def test_streamed_training_is_the_in_memory_training(tmp_path):
    memory = toy_corpus()
    streamed = stream_in_memory(memory, tmp_path / "cache")
    assert isinstance(streamed, StreamedCorpus)
    # Three epochs of 7 batches go round the train split (15 batches): resumed positions and wrapping included.
    config = small_config(train={"epochs": 3, "steps_per_epoch": 7})
    want = losses_of(memory, config, tmp_path / "memory")
    got = losses_of(streamed, config, tmp_path / "stream")
    assert got == want  # bit for bit: the batches are the same tensors


def test_train_flag_picks_the_mode_and_records_it(tmp_path):
    folder = write_corpus_folder(toy_corpus(), tmp_path)
    for mode in ("stream", "memory"):
        run = tmp_path / f"run-{mode}"
        status, _, err = run_cli("train", "--data", folder, "--data-mode", mode, "--dry-run", "--device", "cpu",
                                 "--emsize", 16, "--nhid", 16, "--batch-size", 4, "--bptt", 8, "--run-dir", run)
        assert status == 0, err
        config = json.loads((run / "config.json").read_text())
        assert config["data"]["data_mode"] == mode and config["data_mode_used"] == mode
    status, _, err = run_cli("train", "--data", "generated", "--data-mode", "disk", "--dry-run")
    assert "--data-mode" in one_line_error(status, err)


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_generated_corpus_in_either_mode(tmp_path, mode):
    corpus = resolve_corpus("generated", cache_dir=tmp_path, mode=mode)
    assert isinstance(corpus, Corpus if mode == "memory" else StreamedCorpus) and corpus.mode == mode
    assert corpus.vocab == generated_corpus().vocab


@pytest.mark.slow
def test_streamed_wikitext2_trains_to_the_same_losses_and_perplexities(wikitext2_dir, tmp_path):
    """Wikitext-2 streamed from the token cache and held in memory: the same per-step losses and the same
    validation and test perplexities (a short run: 12 steps of a small model, evaluation on 20 batches)."""
    runs = {}
    for mode in ("memory", "stream"):
        losses = []
        corpus = resolve_corpus(str(wikitext2_dir), cache_dir=tmp_path / "cache", mode=mode)
        assert corpus.mode == mode
        config = small_config(data={"batch_size": 20, "bptt": 35, "eval_batch_size": 10},
                              train={"max_steps": 12, "eval_batches": 20, "log_interval": 6})
        trainer = Trainer(config, corpus, torch.device("cpu"), quiet_display(),
                          on_step=lambda step, loss: losses.append(float(loss)))
        result = trainer.fit(RunFolder(tmp_path / mode))
        runs[mode] = (losses, result.pause["val_ppl"], result.pause["test_ppl"])
    assert len(runs["memory"][0]) == 12
    assert runs["stream"] == runs["memory"]  # bit for bit: the same batches, the same arithmetic
