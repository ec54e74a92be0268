"""Incremental detokenization with stop strings.

Byte-level BPE tokens need not end on a character boundary, so text is released only once it decodes
cleanly; a stop string may span tokens, so the text that could still start one is held back too.
"""

from __future__ import annotations


class Detokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...] = (), skip_prefix: str = ""):
        """`skip_prefix`: text the generated text starts with that is not to be returned (token healing)."""
        self.tokenizer = tokenizer
        self.stop = stop
        self.skip_prefix = skip_prefix
        self.token_ids: list[int] = []
        self.text = ""  # decoded so far, cut at a stop string once one appears
        self.sent = 0  # characters of `text` already returned
        self.stopped = False

    def add(self, token_id: int) -> tuple[str, bool]:
        """Returns (text that is now final, whether a stop string appeared)."""
        self.token_ids.append(token_id)
        text = self.decoded()
        if text.endswith("\ufffd"):
            return "", False  # in the middle of a multi-byte character
        self.text = text
        hits = [at for at in (text.find(s) for s in self.stop) if at != -1]
        if hits:  # the stop string that appears first wins
            self.text = text[:min(hits)]
            self.stopped = True
        hold = 0 if self.stopped else max((len(s) - 1 for s in self.stop), default=0)
        return self._release(len(self.text) - hold), self.stopped

    def decoded(self) -> str:
        """The text of every token added, less the skipped prefix."""
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        return text[len(self.skip_prefix):] if text.startswith(self.skip_prefix) else text

    def flush(self) -> str:
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent:upto], upto
        return piece
