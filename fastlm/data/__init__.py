"""Corpora for fastlm: Wikitext-2 (found, cached or downloaded), any folder of text, or a generated one.

``resolve_corpus(spec)`` is the front door; the rest is for code that needs one step of it.
"""

from fastlm.data.cache import default_cache_dir
from fastlm.data.corpus import EOS, SPLITS, Corpus, Vocabulary, corpus_from_texts, load_corpus, split_words
from fastlm.data.download import DownloadError, download_wikitext2
from fastlm.data.sources import GENERATED, WIKITEXT2, resolve_corpus
from fastlm.data.synthetic import generated_corpus

__all__ = [
    "EOS",
    "GENERATED",
    "SPLITS",
    "WIKITEXT2",
    "Corpus",
    "DownloadError",
    "Vocabulary",
    "corpus_from_texts",
    "default_cache_dir",
    "download_wikitext2",
    "generated_corpus",
    "load_corpus",
    "resolve_corpus",
    "split_words",
]
