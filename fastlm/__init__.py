"""fastlm: a performance-focused training engine for word-level recurrent language models."""

__version__ = "0.1.0"
