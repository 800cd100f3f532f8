"""Corpora for fastlm: Wikitext-2 (found, cached or downloaded), any folder of text, or a generated one.

``resolve_corpus(spec, mode=...)`` (fastlm.data.sources) is the front door: an in-memory ``Corpus``
(fastlm.data.corpus) or, for corpora bigger than memory, a ``StreamedCorpus`` (fastlm.data.stream); both give a
split's batches through ``corpus.batches(split, batch_size, bptt, device)`` (fastlm.data.batching). The token
cache (fastlm.data.cache), the downloader (fastlm.data.download), the split files (fastlm.data.split_files) and
the generated corpus (fastlm.data.synthetic) are the steps underneath, for code that needs one of them.
"""

from fastlm.data.cache import default_cache_dir
from fastlm.data.corpus import EOS, SPLITS, Corpus, Vocabulary, corpus_from_texts, load_corpus, split_words
from fastlm.data.download import DownloadError, download_wikitext2
from fastlm.data.sources import GENERATED, STREAM_ABOVE_BYTES, WIKITEXT2, load_data, resolve_corpus
from fastlm.data.stream import StreamedCorpus
from fastlm.data.synthetic import generated_corpus

__all__ = [
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
