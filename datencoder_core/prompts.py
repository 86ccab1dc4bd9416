"""Token ids of a prompt template and the slot of its concept token: one function for every backend.

A template such as ``"a photo of {}"`` is tokenized as its two parts around ``{}``, and the slot is the
position between them. The slot is found by position, never by searching the ids for the concept's
token, so v* cannot land on one of the prompt's own words when its nearest token is "a", "photo" or
"of". Tuning tokenizes its template once per personalization and then only fills the slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .errors import DATEncoderError

SLOT = "{}"


@dataclass(frozen=True)
class PromptIds:
    """A tokenized template: ``ids`` is the text encoder's full input (start token, the template's
    tokens, end token, padding), with ``ids[slot]`` the slot (``slot`` is None for a template
    without one)."""

    ids: tuple[int, ...]
    slot: int | None

    def with_token(self, token_id: int) -> list[int]:
        """The ids with the slot holding ``token_id`` (the hard prompt of Eq. 5)."""
        ids = list(self.ids)
        if self.slot is not None:
            ids[self.slot] = token_id
        return ids


@dataclass(frozen=True)
class TokenizerSpec:
    """What ``prompt_ids`` needs of a backend's tokenizer. ``tokenize`` returns a text's ids without
    start and end tokens."""

    tokenize: Callable[[str], list[int]]
    start: int
    end: int
    pad: int
    length: int  # the text encoder's input length (77 for SD1.x)


def prompt_ids(template: str, tokenizer: TokenizerSpec) -> PromptIds:
    """Tokenize ``template`` (at most one ``{}``) into a full-length ``PromptIds``."""
    if template.count(SLOT) > 1:
        raise DATEncoderError(f"prompt {template!r} has {template.count(SLOT)} '{{}}' slots; expected at most one")
    before, slot, after = template.partition(SLOT)
    ids_before = tokenizer.tokenize(before.strip()) if before.strip() else []
    ids_after = tokenizer.tokenize(after.strip()) if after.strip() else []
    ids = [tokenizer.start, *ids_before, *([tokenizer.pad] if slot else []), *ids_after, tokenizer.end]
    if len(ids) > tokenizer.length:
        raise DATEncoderError(f"prompt {template!r} is {len(ids)} tokens long; the text encoder takes "
                              f"{tokenizer.length}")
    ids += [tokenizer.pad] * (tokenizer.length - len(ids))
    return PromptIds(tuple(ids), 1 + len(ids_before) if slot else None)
