"""Prompts with a concept token, on a ComfyUI CLIP (host hook: token lists accept an embedding tensor
in place of a token id, ``SDClipModel.process_tokens``).

The soft prompt puts v* where the placeholder is; the hard prompt puts the concept's nearest real
token there (Eq. 5's C and C_h). The placeholder may appear several times; each occurrence becomes
one token. Several concepts, each with its own placeholder (``S1*``, ``S2*``), are encoded in one prompt:
the text encoder reads the whole text at once (its attention is causal), so the concepts cannot be
encoded apart and joined afterwards.
"""

from __future__ import annotations

from ..datencoder_core import Concept, DATEncoderError
from ..datencoder_core.checkpoint import check_base_model
from .patching import HARD_CONTEXT_KEY


def placeholder_ids(clip, placeholder: str) -> list[int]:
    """The token ids the placeholder (or any short text) alone tokenizes to, between the start and the
    end token."""
    [chunk] = next(iter(clip.tokenize(placeholder).values()))
    ids = [int(token) for token, *_ in chunk]
    return ids[1:ids.index(ids[-1], 1)]  # SD1 pads with the end token


def replace_placeholders(tokens: dict, spans: list[list[int]], replacements: list) -> tuple[dict, list[int]]:
    """Replace every occurrence of each span in every chunk by one entry, its replacement, padding each
    chunk back to its length; return the new tokens and the number of occurrences of each span. One
    pass, longest span first, so a replacement is never matched again and a span inside another is not
    taken from it."""
    order = sorted(range(len(spans)), key=lambda i: -len(spans[i]))
    found, out = [0] * len(spans), {}
    for key, chunks in tokens.items():
        out[key] = []
        for chunk in chunks:
            ids = [token if isinstance(token, int) else None for token, *_ in chunk]
            new, i = [], 0
            while i < len(chunk):
                match = next((j for j in order if ids[i:i + len(spans[j])] == spans[j]), None)
                if match is None:
                    new.append(chunk[i])
                    i += 1
                else:
                    new.append((replacements[match], *chunk[i][1:]))
                    i += len(spans[match])
                    found[match] += 1
            out[key].append(new + [chunk[-1]] * (len(chunk) - len(new)))
    return out, found


def placeholder_problem(placeholder: str) -> str | None:
    """None for a usable placeholder; else what is wrong and how to fix it (Concept List checks this when
    a prompt is queued)."""
    return None if placeholder.strip() else "the placeholder is empty; use a word such as S* (or S1*, S2*)"


def prompt_problem(text: str, placeholder: str) -> str | None:
    """None when ``text`` contains a non-empty ``placeholder``; else what is wrong and how to fix it.
    Apply Concept Token checks this when a prompt is queued, before anything runs."""
    if (problem := placeholder_problem(placeholder)) is not None:
        return problem
    if placeholder not in text:
        return (f"the prompt does not contain the placeholder {placeholder!r}: write it where the concept goes, "
                f"e.g. 'a photo of {placeholder} on the beach'")
    return None


def encode_with_concepts(clip, text: str, concepts: list[tuple[str, Concept]]) -> list:
    """CONDITIONING for ``text`` with (placeholder, concept) pairs: the soft prompt (every placeholder as
    its concept's v*) as the context, the hard prompt (every placeholder as its concept's nearest word)
    attached under ``HARD_CONTEXT_KEY`` for the Dual-Path Model Patch. Raises, naming the placeholder, if
    one is missing from the text, two are the same, or the concepts are for different base models."""
    for placeholder, _ in concepts:
        problem = prompt_problem(text, placeholder)
        if problem is not None:
            raise DATEncoderError(problem)
    (first, reference), *others = concepts
    for placeholder, concept in others:
        check_base_model(f"{concept.label} for {placeholder!r}", concept.base_fingerprint,
                         f"the base model of {reference.label} for {first!r}", reference.base_fingerprint)
    tokens = clip.tokenize(text)
    if set(tokens) != {"l"}:
        raise DATEncoderError(f"Apply Concept Token needs an SD1.x CLIP (one CLIP-L text encoder); this CLIP has "
                              f"{sorted(tokens)}")
    width = clip.cond_stage_model.clip_l.transformer.get_input_embeddings().weight.shape[-1]
    for placeholder, concept in concepts:
        if concept.v_star.shape[-1] != width:
            raise DATEncoderError(f"the concept for {placeholder!r} has a {concept.v_star.shape[-1]}-d embedding, "
                                  f"this CLIP's tokens are {width}-d: the concept was made for another base model")
    spans = [placeholder_ids(clip, placeholder) for placeholder, _ in concepts]
    for i, (placeholder, _) in enumerate(concepts):
        for j, (earlier, _) in enumerate(concepts[:i]):
            if spans[j] == spans[i]:
                same = (repr(earlier) if earlier == placeholder
                        else f"{earlier!r} and {placeholder!r} (CLIP ignores case)")
                raise DATEncoderError(f"two concepts have the same placeholder {same}; give each concept its own, "
                                      f"e.g. S1* and S2*")
    soft_tokens, found = replace_placeholders(tokens, spans, [concept.v_star for _, concept in concepts])
    for (placeholder, _), count in zip(concepts, found):
        if count == 0:
            raise DATEncoderError(f"the placeholder {placeholder!r} is attached to other characters in the prompt "
                                  f"and tokenizes differently; put spaces around it")
    hard_tokens, _ = replace_placeholders(tokens, spans, [concept.token_id for _, concept in concepts])
    soft, pooled = clip.encode_from_tokens(soft_tokens, return_pooled=True)
    hard = clip.encode_from_tokens(hard_tokens)
    return [[soft, {"pooled_output": pooled, HARD_CONTEXT_KEY: hard}]]
