"""Corpora for fastlm: Wikitext-2 (found, cached or downloaded), any folder of text, or a generated one.

``resolve_corpus(spec, mode=...)`` is the front door: an in-memory ``Corpus`` or, for corpora bigger than
memory, a ``StreamedCorpus`` (fastlm.data.data_modes); both give a split's batches through
``corpus.batches(split, batch_size, bptt, device)``. The rest is for code that needs one step of it.
"""

from fastlm.data.cache import default_cache_dir
from fastlm.data.corpus import EOS, SPLITS, Corpus, Vocabulary, corpus_from_texts, load_corpus, split_words
from fastlm.data.data_modes import DATA_MODES, STREAM_ABOVE_BYTES, load_data
from fastlm.data.download import DownloadError, download_wikitext2
from fastlm.data.sources import GENERATED, WIKITEXT2, resolve_corpus
from fastlm.data.streamed_corpus import StreamedCorpus
from fastlm.data.synthetic import generated_corpus

__all__ = [
    "DATA_MODES",
    "EOS",
    "GENERATED",
    "SPLITS",
    "STREAM_ABOVE_BYTES",
    "WIKITEXT2",
    "Corpus",
    "DownloadError",
    "StreamedCorpus",
    "Vocabulary",
    "corpus_from_texts",
    "default_cache_dir",
    "download_wikitext2",
    "generated_corpus",
    "load_corpus",
    "load_data",
    "resolve_corpus",
    "split_words",
]
