"""A split file as decoded text in bounded pieces, exactly as the example reads it, without holding the file.

The example opens each file as strict UTF-8 in text mode (universal newlines: "\\r\\n" and a lone "\\r" become
"\\n") and makes a line of everything up to each "\\n". ``text_pieces`` decodes the file block by block with
an incremental decoder (a character split across two blocks is joined), turns line ends into "\\n" (a "\\r"
at a block's end waits for the next block, which may start with its "\\n"), and cuts every piece just after
its last "\\n", so a line is never split between pieces. A line too long to hold is cut at whitespace
instead, which leaves its words whole. The final piece is closed with "\\n" when the file's last line has
none: it is still a line. Then, for every piece, ``piece.replace("\\n", " <eos> ").split()`` gives its tokens,
and the pieces' tokens joined are the whole file's (fastlm.data.tokenize.split_words).
"""

from __future__ import annotations

import codecs
from pathlib import Path

from fastlm.data.split_files import has_no_word, not_utf8, read_blocks

# A piece's tokens cost ~30 bytes of Python objects per byte of text while it is tokenised; 64 KiB pieces
# keep that near 2 MB and, staying in the CPU's caches, tokenise fastest (measured: 16 KiB-4 MiB, Wikitext-2).
TEXT_BLOCK_BYTES = 64 << 10
MAX_CARRY_CHARS = 4 * TEXT_BLOCK_BYTES  # a line longer than this is cut at whitespace rather than held whole


def text_pieces(path: Path, block_bytes: int | None = None):
    """The decoded text of ``path`` as pieces ending in "\\n" (or, inside a very long line, in whitespace),
    read ``block_bytes`` (default TEXT_BLOCK_BYTES) at a time.

    Raises FastlmError, after the pieces before the problem, if the file cannot be read, is not UTF-8, is
    empty or has only whitespace.
    """
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    carry = ""  # the text after the last cut, not handed out yet
    piece = ""  # the latest piece handed out
    fed = 0  # bytes given to the decoder so far
    has_word = False
    blocks = read_blocks(path, block_bytes or TEXT_BLOCK_BYTES)
    while True:
        block = next(blocks, None)
        final = block is None
        pending = decoder.getstate()[0]
        try:
            text = carry + decoder.decode(block or b"", final)
        except UnicodeDecodeError as error:
            offset = fed - len(pending) + error.start
            raise not_utf8(path, error.object[error.start], offset) from None
        fed += len(block or b"")
        held = ""
        if not final and text.endswith("\r"):
            text, held = text[:-1], "\r"  # it may be the first half of a "\r\n" split between blocks
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        if final:
            if not (text or piece).endswith("\n") and (text or piece):
                text += "\n"  # the last line has no newline but is still a line
            cut = len(text)
        else:
            cut = _cut(text)
        if cut:
            piece, carry = text[:cut], text[cut:] + held
            has_word = has_word or not piece.isspace()
            yield piece
        else:
            carry = text + held
        if final:
            break
    if not has_word:
        raise has_no_word(path, empty=fed == 0)


def _cut(text: str) -> int:
    """Where to end the piece handed out now: after the last "\\n"; in a line too long to hold, after its last
    whitespace; else nothing yet (0)."""
    cut = text.rfind("\n") + 1
    if cut or len(text) <= MAX_CARRY_CHARS:
        return cut
    if text[-1].isspace():
        return len(text)
    head = text.rsplit(maxsplit=1)  # from the right: costs only the last word
    return len(text) - len(head[1]) if len(head) == 2 else 0  # no whitespace at all: one word, held whole
