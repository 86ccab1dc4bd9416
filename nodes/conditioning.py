"""Prompts with a concept token, on a ComfyUI CLIP (host hook: token lists accept an embedding tensor
in place of a token id, ``SDClipModel.process_tokens``).

The soft prompt puts v* where the placeholder is; the hard prompt puts the concept's nearest real
token there (Eq. 5's C and C_h). The placeholder may appear several times; each occurrence becomes
one token.
"""

from __future__ import annotations

from ..datencoder_core import Concept, DATEncoderError
from .patching import HARD_CONTEXT_KEY


def placeholder_ids(clip, placeholder: str) -> list[int]:
    """The token ids the placeholder (or any short text) alone tokenizes to, between the start and the
    end token."""
    [chunk] = next(iter(clip.tokenize(placeholder).values()))
    ids = [int(token) for token, *_ in chunk]
    return ids[1:ids.index(ids[-1], 1)]  # SD1 pads with the end token


def replace_placeholder(tokens: dict, span: list[int], replacement) -> tuple[dict, int]:
    """Replace every occurrence of ``span`` in every chunk by one ``replacement`` entry, padding each
    chunk back to its length; return the new tokens and the number of occurrences."""
    found, out = 0, {}
    for key, chunks in tokens.items():
        out[key] = []
        for chunk in chunks:
            ids = [token if isinstance(token, int) else None for token, *_ in chunk]
            new, i = [], 0
            while i < len(chunk):
                if ids[i:i + len(span)] == span:
                    new.append((replacement, *chunk[i][1:]))
                    i += len(span)
                    found += 1
                else:
                    new.append(chunk[i])
                    i += 1
            out[key].append(new + [chunk[-1]] * (len(chunk) - len(new)))
    return out, found


def prompt_problem(text: str, placeholder: str) -> str | None:
    """None when ``text`` contains a non-empty ``placeholder``; else what is wrong and how to fix it.
    Apply Concept Token checks this when a prompt is queued, before anything runs."""
    if not placeholder.strip():
        return "the placeholder is empty; use a word such as S*"
    if placeholder not in text:
        return (f"the prompt does not contain the placeholder {placeholder!r}: write it where the concept goes, "
                f"e.g. 'a photo of {placeholder} on the beach'")
    return None


def encode_with_concept(clip, text: str, concept: Concept, placeholder: str = "S*") -> list:
    """CONDITIONING for ``text``: the soft prompt as the context, the hard prompt attached under
    ``HARD_CONTEXT_KEY`` for the Dual-Path Model Patch. Raises if the placeholder is missing."""
    problem = prompt_problem(text, placeholder)
    if problem is not None:
        raise DATEncoderError(problem)
    tokens = clip.tokenize(text)
    if set(tokens) != {"l"}:
        raise DATEncoderError(f"Apply Concept Token needs an SD1.x CLIP (one CLIP-L text encoder); this CLIP has "
                              f"{sorted(tokens)}")
    width = clip.cond_stage_model.clip_l.transformer.get_input_embeddings().weight.shape[-1]
    if concept.v_star.shape[-1] != width:
        raise DATEncoderError(f"the concept's embedding is {concept.v_star.shape[-1]}-d, this CLIP's tokens are "
                              f"{width}-d: the concept was made for another base model")
    span = placeholder_ids(clip, placeholder)
    soft_tokens, found = replace_placeholder(tokens, span, concept.v_star)
    if found == 0:
        raise DATEncoderError(f"the placeholder {placeholder!r} is attached to other characters in the prompt "
                              f"and tokenizes differently; put spaces around it")
    hard_tokens, _ = replace_placeholder(tokens, span, concept.token_id)
    soft, pooled = clip.encode_from_tokens(soft_tokens, return_pooled=True)
    hard = clip.encode_from_tokens(hard_tokens)
    return [[soft, {"pooled_output": pooled, HARD_CONTEXT_KEY: hard}]]
