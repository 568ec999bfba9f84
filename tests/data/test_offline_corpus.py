"""The offline English corpus (the standard library's docstrings): built the same way every time, prose only,
each paragraph once, and large enough for a perplexity study."""

from __future__ import annotations

from lorakit.data.offline_corpus import corpus_fingerprint, english_corpus


def test_the_offline_corpus_is_deterministic_prose_and_large_enough():
    documents = english_corpus()
    assert corpus_fingerprint(documents) == corpus_fingerprint(english_corpus())
    assert sum(map(len, documents)) > 200_000  # about 59K tokens of the default model's tokenizer on CPython 3.11
    paragraphs = [p for d in documents for p in d.split("\n\n")]
    assert len(paragraphs) == len(set(paragraphs))
    assert not any(">>>" in p or p.startswith(" ") for p in paragraphs)
    assert all(len(p.split()) >= 12 for p in paragraphs)
