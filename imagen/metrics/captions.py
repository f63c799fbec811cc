"""Caption attribute accuracy on the shapes data: parse a generated caption back into a scene and check it
against the ground truth with the judge's own rule (`matches_caption`), or count the attributes it keeps."""

from __future__ import annotations

import re
from itertools import permutations

from imagen.data.shapes import (
    INVERSE_RELATION,
    PALETTE,
    POSITION_PHRASES,
    RELATIONS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    matches_caption,
)

_DESCRIPTION = re.compile(rf"\b({'|'.join(SIZES)}) ({'|'.join(PALETTE)}) ({'|'.join(SHAPES)})\b")
_RELATION = re.compile(rf"\b({'|'.join(RELATIONS)})\b")
_PHRASES = sorted(((p, cell) for cell, ps in POSITION_PHRASES.items() for p in ps), key=lambda x: -len(x[0]))


def parse_shapes_caption(caption: str) -> Scene | None:
    """The scene a shapes caption states (any of the renderer's paraphrases), or None if it states none clearly.

    A two-object caption fixes no absolute cells: its objects get the placeholder position "center" and the
    scene carries the relation. "a B and a A <rel> it" states A <rel> B.
    """
    text = " ".join(caption.lower().replace(",", " , ").split())
    descriptions = [
        ShapeObject(color, shape, size, "center") for size, color, shape in _DESCRIPTION.findall(text)
    ]
    if len(descriptions) == 1:
        found = [cell for phrase, cell in _PHRASES if re.search(rf"\b{phrase}\b", text)]
        if not found:
            return None
        obj = descriptions[0]
        return Scene((ShapeObject(obj.color, obj.shape, obj.size, found[0]),))  # longest phrase wins
    relations = _RELATION.findall(text)
    if len(descriptions) != 2 or len(relations) != 1:
        return None
    first, second = descriptions
    if re.search(r"\band a\b.*\bit$", text):  # "a B and a A <rel> it": the second one is the subject
        first, second = second, first
    return Scene((first, second), relations[0])


def caption_correct(caption: str, truth: Scene) -> bool:
    """Whether everything the caption says holds for the true scene (and it mentions every object)."""
    parsed = parse_shapes_caption(caption)
    return parsed is not None and matches_caption(list(truth.objects), parsed)


def preserved_attributes(caption: str, prompt: Scene) -> tuple[int, int]:
    """(how many of the prompt's attributes the caption states again, how many the prompt states): color, shape
    and size of each object, plus the position of a single object or the relation of two.

    The caption's objects are paired with the prompt's in the way that keeps the most (a relation counts when both
    state two objects, read in the pairing's order); objects the prompt lacks cost nothing. A caption that parses
    to no scene keeps nothing.
    """
    total = 3 * len(prompt.objects) + 1
    parsed = parse_shapes_caption(caption)
    if parsed is None:
        return 0, total
    n, m = len(prompt.objects), len(parsed.objects)
    if n <= m:
        pairings = [list(zip(range(n), chosen, strict=True)) for chosen in permutations(range(m), n)]
    else:
        pairings = [list(zip(chosen, range(m), strict=True)) for chosen in permutations(range(n), m)]
    best = 0
    for pairs in pairings:
        kept = sum(
            (p.color == c.color) + (p.shape == c.shape) + (p.size == c.size)
            for p, c in ((prompt.objects[i], parsed.objects[j]) for i, j in pairs)
        )
        if n == m == 1:
            kept += prompt.objects[0].position == parsed.objects[0].position
        elif n == m == 2:
            relation = parsed.relation if pairs[0][1] == 0 else INVERSE_RELATION[parsed.relation]
            kept += relation == prompt.relation
        best = max(best, kept)
    return best, total
