"""Generated token ids -> streamed text, ending at the first stop string.

The gateway detokenizes (workers send token ids only), so stop strings are matched here: `TextStream.add`
keeps the tokens up to the one that completes a stop string and the text before it, and reports the stop;
the caller then cancels the request on its engine.
"""

from __future__ import annotations

from tandem.engine.detokenizer import Detokenizer


class TextStream:
    """Incremental text of one request. Without a tokenizer the text stays empty (and stop is not allowed)."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = (), skip_prefix: str = ""):
        if stop and tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        self._detok = Detokenizer(tokenizer, stop, skip_prefix) if tokenizer is not None else None
        self.stopped = False

    def add(self, token_ids: list[int]) -> tuple[list[int], str]:
        """(tokens to send, text now final); tokens after a completed stop string are dropped."""
        if self.stopped:
            return [], ""
        if self._detok is None:
            return list(token_ids), ""
        kept, text = [], ""
        for token in token_ids:
            kept.append(token)
            piece, self.stopped = self._detok.add(token)
            text += piece
            if self.stopped:
                break
        return kept, text

    def finish(self) -> str:
        """The text still held back: the tail that could have begun a stop string, and an incomplete last
        character (as the tokenizer decodes it), so the streamed text is the decode of the sent tokens."""
        d = self._detok
        if d is None:
            return ""
        if d.stopped:
            return d.flush()
        full = d.decoded()
        sent = d.text[: d.sent]
        if not full.startswith(sent):  # a decode that is not prefix-stable: send what is known to be clean
            return d.flush()
        d.sent, d.text = len(full), full
        return full[len(sent):]
