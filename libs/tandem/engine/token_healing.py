"""Token healing: a text prompt that ends inside what the tokenizer would merge into one token.

Byte-level BPE glues a word's leading space to the word, so a prompt such as "def " ends in a lone-space
token that training text almost never follows with an identifier: the model, seeing it, produces poor text.
Healing (as Microsoft's guidance library does it) backs the prompt up by its last token and makes the first
generated token start with that token's text ("def" + " get_name" instead of "def" + " " + "geoice"). The
prompt's text is unchanged; the generated text drops the part the prompt already shows.

Only prompts given as text are healed: token-id prompts are taken as the caller built them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache

from tandem.engine.sampling import SamplingParams


@dataclass(frozen=True, slots=True)
class HealedPrompt:
    prompt_ids: list[int]  # the prompt without its healed last token
    prefix: str  # the removed token's text: the first generated token starts with it
    allowed_first_tokens: tuple[int, ...]  # the tokens whose text starts with `prefix`; empty = not healed

    def apply(self, params: SamplingParams) -> SamplingParams:
        """`params` with the first-token constraint and the text prefix to drop."""
        if not self.allowed_first_tokens:
            return params
        return dataclasses.replace(params, allowed_first_tokens=self.allowed_first_tokens,
                                   skip_text_prefix=self.prefix)


class TokenHealer:
    """Heals prompts for one tokenizer; the vocabulary's texts are decoded once, the allowed sets cached."""

    def __init__(self, tokenizer):
        vocab_size = tokenizer.get_vocab_size()
        special = {i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special}
        self._texts = tuple("" if i in special else tokenizer.decode([i], skip_special_tokens=False)
                            for i in range(vocab_size))
        self._tokens_starting_with = lru_cache(maxsize=1024)(self._scan)

    def _scan(self, prefix: str) -> tuple[int, ...]:
        return tuple(i for i, text in enumerate(self._texts) if text.startswith(prefix))

    def heal(self, prompt_ids: list[int]) -> HealedPrompt:
        """Back up one token when the prompt's last token is a proper prefix of some other token's text (and
        the prompt keeps at least one token); else the prompt unchanged."""
        unchanged = HealedPrompt(list(prompt_ids), "", ())
        if len(prompt_ids) < 2 or not 0 <= prompt_ids[-1] < len(self._texts):
            return unchanged
        prefix = self._texts[prompt_ids[-1]]
        if not prefix or "\ufffd" in prefix:  # special, or part of a multi-byte character
            return unchanged
        allowed = self._tokens_starting_with(prefix)
        if len(allowed) < 2:  # nothing longer starts with it: the prompt does not end mid-token
            return unchanged
        return HealedPrompt(list(prompt_ids[:-1]), prefix, allowed)
