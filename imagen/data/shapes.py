"""Captioned shapes: procedural scenes rendered deterministically from a seed, with ground truth.

A scene holds one or two objects. Each object has a color, a shape, a size and a cell of a 3x3 grid;
two objects share a row or a column, and their caption states the spatial relation between them
("a small red circle left of a large blue square"). Every scene has several caption paraphrases.

The compositional split holds chosen attribute combinations (for example ``{color: red, shape: triangle}``)
out of the training split, so that generalization to unseen compositions can be measured.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
from PIL import Image, ImageDraw

from imagen.values import check_fraction, check_int, is_int, is_number

# Named colors the renderer knows. A data config picks a subset (default: the first six); the rest are
# available for experiments that introduce a new concept (a color word pre-training never saw).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "cyan": (40, 205, 215),
    "orange": (245, 140, 20),
    "white": (240, 240, 240),
    "pink": (250, 130, 190),
    "brown": (130, 80, 40),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SIZES = ("small", "large")
GRID = 3  # positions are the cells of a GRID x GRID layout, row-major
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
# How a caption says where a single object is; several phrasings per cell.
POSITION_PHRASES = {
    "top left": ("in the top left", "at the top left"),
    "top": ("at the top", "at the top center"),
    "top right": ("in the top right", "at the top right"),
    "left": ("on the left", "at the left"),
    "center": ("in the center", "in the middle"),
    "right": ("on the right", "at the right"),
    "bottom left": ("in the bottom left", "at the bottom left"),
    "bottom": ("at the bottom", "at the bottom center"),
    "bottom right": ("in the bottom right", "at the bottom right"),
}
RELATIONS = ("left of", "right of", "above", "below")
INVERSE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
SIZE_FRACTION = {"small": 0.55, "large": 0.85}  # object extent as a fraction of a grid cell


@dataclass(frozen=True)
class ShapeObject:
    color: str
    shape: str
    size: str
    position: str  # one of POSITIONS

    @property
    def row(self) -> int:
        return POSITIONS.index(self.position) // GRID

    @property
    def col(self) -> int:
        return POSITIONS.index(self.position) % GRID

    def describe(self) -> str:
        return f"{self.size} {self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """One or two objects; with two, the caption says ``objects[0] <relation> objects[1]``."""

    objects: tuple[ShapeObject, ...]
    relation: str | None = None

    def captions(self) -> list[str]:
        """All paraphrases of this scene's caption (the first is the canonical one)."""
        if len(self.objects) == 1:
            (obj,) = self.objects
            first, second = POSITION_PHRASES[obj.position]
            d = obj.describe()
            return [f"a {d} {first}", f"there is a {d} {second}", f"{first}, a {d}", f"one {d} {second}"]
        a, b = (o.describe() for o in self.objects)
        rel, inv = self.relation, INVERSE_RELATION[self.relation]
        return [
            f"a {a} {rel} a {b}",
            f"there is a {a} {rel} a {b}",
            f"a {b} {inv} a {a}",
            f"a {b} and a {a} {rel} it",
        ]

    def attributes_swapped(self) -> Scene | None:
        """The same layout and relation with the two objects' color, shape and size exchanged (its caption has the
        same words in another order). None for one object, or for two that look the same."""
        if len(self.objects) != 2 or self.objects[0].describe() == self.objects[1].describe():
            return None
        a, b = self.objects
        return Scene(
            (
                replace(a, color=b.color, shape=b.shape, size=b.size),
                replace(b, color=a.color, shape=a.shape, size=a.size),
            ),
            self.relation,
        )

    def hard_negative(
        self,
        rng: np.random.Generator,
        positions: list[str],
        sizes: list[str],
        keep: Callable[[Scene], bool] | None = None,
    ) -> Scene | None:
        """A scene whose caption is false of this one's image but close to its caption, a hard negative for
        contrastive matching (NegCLIP): two objects exchange their appearances; one object moves to another of
        `positions` or takes another of `sizes` (either at even odds). It never pairs a color with a shape this scene
        lacks. Only scenes `keep` accepts are drawn (a training split's: no held-out composition). None for two
        objects that look the same, or when `keep` accepts none."""
        if len(self.objects) == 2:
            swapped = self.attributes_swapped()
            return swapped if swapped is not None and (keep is None or keep(swapped)) else None
        (obj,) = self.objects
        resized = [Scene((replace(obj, size=s),)) for s in sizes if s != obj.size]
        moved = [Scene((replace(obj, position=p),)) for p in positions if p != obj.position]
        kinds = [[s for s in kind if keep is None or keep(s)] for kind in (resized, moved)]
        kinds = [kind for kind in kinds if kind]
        if not kinds:
            return None
        kind = kinds[0] if len(kinds) == 1 or rng.random() < 0.5 else kinds[1]
        return kind[rng.integers(len(kind))]

    def mirrored(self) -> Scene:
        """The scene mirrored left-right: what its image flipped horizontally shows (every shape is symmetric about
        its vertical axis), with left and right exchanged in the positions and the relation."""
        return Scene(
            tuple(replace(o, position=mirror_words(o.position)) for o in self.objects),
            None if self.relation is None else mirror_words(self.relation),
        )


def mirror_words(phrase: str) -> str:
    """A position or relation with left and right exchanged ("top left" -> "top right", "left of" -> "right of")."""
    swap = {"left": "right", "right": "left"}
    return " ".join(swap.get(word, word) for word in phrase.split())


def relation_holds(relation: str, a: ShapeObject, b: ShapeObject) -> bool:
    """Whether ``a <relation> b`` holds for the objects' grid cells."""
    if relation == "left of":
        return a.col < b.col
    if relation == "right of":
        return a.col > b.col
    if relation == "above":
        return a.row < b.row
    if relation == "below":
        return a.row > b.row
    raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")


@dataclass
class ShapesConfig:
    """What the renderer draws. Everything that changes pixels is part of `appearance_key()`."""

    image_size: int = 32
    colors: list[str] = field(default_factory=lambda: ["red", "green", "blue", "yellow", "purple", "cyan"])
    shapes: list[str] = field(default_factory=lambda: ["circle", "square", "triangle"])
    sizes: list[str] = field(default_factory=lambda: list(SIZES))
    positions: list[str] = field(default_factory=lambda: list(POSITIONS))
    max_objects: int = 2
    two_object_prob: float = 0.5
    jitter: int = 1  # random offset of an object's center, in whole pixels (objects stay pixel-aligned)
    size_jitter: float = 0.0  # random relative change of an object's size
    background: tuple[int, int, int] = (0, 0, 0)
    supersample: int = 4  # render at this multiple, then downsample: anti-aliased edges
    # Attribute combinations held out of training, e.g. [{"color": "red", "shape": "triangle"}].
    heldout: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        def check(name: str, values: list[str], known) -> None:
            unknown = [v for v in values if v not in known]
            if unknown or not values:
                raise ValueError(
                    f"data.{name}: unknown or empty {unknown or values}; choose from {list(known)}"
                )
            if len(set(values)) != len(values):
                raise ValueError(f"data.{name}: duplicate entries in {values}")

        check("colors", self.colors, PALETTE)
        check("shapes", self.shapes, SHAPES)
        check("sizes", self.sizes, SIZES)
        check("positions", self.positions, POSITIONS)
        if not is_int(self.max_objects) or self.max_objects not in (1, 2):
            raise ValueError(f"data.max_objects must be 1 or 2, got {self.max_objects!r}")
        check_fraction("data.two_object_prob", self.two_object_prob)
        check_int("data.image_size", self.image_size, 16)
        if not is_int(self.jitter) or self.jitter < 0:
            raise ValueError(f"data.jitter must be a whole number of pixels >= 0, got {self.jitter!r}")
        if 2 * GRID * self.jitter >= self.image_size:  # an object's center would leave its grid cell
            raise ValueError(
                f"data.jitter={self.jitter} moves an object's center out of its grid cell "
                f"(data.image_size / {GRID} = {self.image_size / GRID:.1f} pixels): it must be < "
                f"data.image_size / {2 * GRID}, e.g. data.jitter=1"
            )
        # an object's radius is scaled by 1 + uniform(-size_jitter, size_jitter): it must stay positive
        if not is_number(self.size_jitter) or not 0.0 <= self.size_jitter < 1.0:
            raise ValueError(
                f"data.size_jitter must be a number in [0, 1) (the largest relative change of an object's size, "
                f"e.g. data.size_jitter=0.1), got {self.size_jitter!r}"
            )
        check_int("data.supersample", self.supersample, 1, " (1: no anti-aliasing)")
        bg = self.background
        if (
            isinstance(bg, str | bytes)
            or not isinstance(bg, Sequence)
            or len(bg) != 3
            or not all(is_int(v) and 0 <= v <= 255 for v in bg)
        ):
            raise ValueError(
                f"data.background must be three integers in [0, 255] (an RGB color, e.g. [0, 0, 0]), got {bg!r}"
            )
        self.background = tuple(int(v) for v in bg)
        self.heldout = as_combinations(self.heldout, "data.heldout")
        self.check_combinations(self.heldout, "data.heldout")

    def check_combinations(self, combos: list[dict[str, str]], key: str) -> None:
        """Attribute combinations (`[{color: red, shape: triangle}]`) must name configured attributes."""
        attrs = {"color": self.colors, "shape": self.shapes, "size": self.sizes, "position": self.positions}
        for combo in as_combinations(combos, key):
            if not combo:
                raise ValueError(f"{key}: an empty combination matches every object")
            for name, value in combo.items():
                if name not in attrs or value not in attrs[name]:
                    raise ValueError(
                        f"{key}: {dict(combo)} names {name}={value!r}, which is not among the configured "
                        f"attributes {attrs.get(name, list(attrs))}"
                    )

    def appearance_key(self) -> str:
        """A short hash of everything that changes rendered pixels (and the attribute vocabularies)."""
        d = asdict(self)
        for k in ("heldout", "max_objects", "two_object_prob"):
            d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    def is_heldout(self, obj: ShapeObject) -> bool:
        return has_combination(obj, self.heldout)


COMBINATION_EXAMPLE = "{color: red, shape: triangle}"


def as_combinations(value, key: str) -> list[dict[str, str]]:
    """Attribute combinations (`heldout`, `new_concept`) as a list of dicts; `ValueError` naming `key` unless
    `value` is a list of mappings (None: none)."""
    if value is None:
        return []
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Sequence):
        raise ValueError(
            f"{key} must be a list of attribute combinations, each a mapping such as {COMBINATION_EXAMPLE}; "
            f"got {value!r}"
        )
    for combo in value:
        if not isinstance(combo, Mapping):
            raise ValueError(
                f"{key}: the entry {combo!r} is not an attribute combination; each entry is a mapping such as "
                f"{COMBINATION_EXAMPLE}, e.g. {key}='[{COMBINATION_EXAMPLE}]'"
            )
    return [dict(c) for c in value]


def has_combination(obj: ShapeObject, combos: list[dict[str, str]]) -> bool:
    """Whether the object shows every attribute of one of the combinations."""
    return any(all(getattr(obj, k) == v for k, v in combo.items()) for combo in combos)


def _pairs_in_line(positions: list[str]) -> list[tuple[str, str, str]]:
    """All (a, b, relation) of distinct allowed cells sharing a row (left/right) or a column (above/below)."""
    out = []
    for a in positions:
        for b in positions:
            ra, ca = divmod(POSITIONS.index(a), GRID)
            rb, cb = divmod(POSITIONS.index(b), GRID)
            if a == b:
                continue
            if ra == rb:
                out.append((a, b, "left of" if ca < cb else "right of"))
            elif ca == cb:
                out.append((a, b, "above" if ra < rb else "below"))
    return out


class SceneSampler:
    """Draws random scenes from a `ShapesConfig`, optionally restricted to seen or held-out compositions."""

    def __init__(self, config: ShapesConfig):
        self.config = config
        self.pairs = _pairs_in_line(config.positions)
        if config.max_objects == 2 and config.two_object_prob > 0 and not self.pairs:
            raise ValueError("data.positions: two-object scenes need two positions in one row or column")

    def _object(self, rng: np.random.Generator, position: str) -> ShapeObject:
        c = self.config
        return ShapeObject(
            color=c.colors[rng.integers(len(c.colors))],
            shape=c.shapes[rng.integers(len(c.shapes))],
            size=c.sizes[rng.integers(len(c.sizes))],
            position=position,
        )

    def sample(self, rng: np.random.Generator, heldout: bool | None = None) -> Scene:
        """A random scene. `heldout=False`: no held-out object; True: at least one; None: unrestricted."""
        c = self.config
        if heldout and not c.heldout:
            raise ValueError("asked for held-out scenes but data.heldout is empty")
        for _ in range(10_000):
            two = c.max_objects == 2 and rng.random() < c.two_object_prob
            if two:
                pa, pb, relation = self.pairs[rng.integers(len(self.pairs))]
                scene = Scene((self._object(rng, pa), self._object(rng, pb)), relation)
            else:
                scene = Scene((self._object(rng, c.positions[rng.integers(len(c.positions))]),))
            has_heldout = any(c.is_heldout(o) for o in scene.objects)
            if heldout is None or has_heldout == heldout:
                return scene
        raise RuntimeError(
            "could not sample a scene that satisfies data.heldout; is every combination held out?"
        )


def render(scene: Scene, config: ShapesConfig, rng: np.random.Generator) -> np.ndarray:
    """Render a scene to a uint8 array of shape (H, W, 3); `rng` draws the position/size jitter."""
    s = config.supersample
    cell = config.image_size / GRID  # in output pixels
    image = Image.new("RGB", (config.image_size * s,) * 2, tuple(config.background))
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        # centers on whole output pixels: an object looks the same wherever it stands (pixel-aligned sprites)
        cx = round((obj.col + 0.5) * cell) + int(rng.integers(-config.jitter, config.jitter + 1))
        cy = round((obj.row + 0.5) * cell) + int(rng.integers(-config.jitter, config.jitter + 1))
        r = 0.5 * cell * SIZE_FRACTION[obj.size] * (1 + rng.uniform(-config.size_jitter, config.size_jitter))
        _draw_shape(draw, obj.shape, cx * s, cy * s, r * s, PALETTE[obj.color])
    image = image.resize((config.image_size, config.image_size), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.uint8)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, color) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
    elif shape == "square":
        q = r * 0.88  # equal visual area to the circle, roughly
        draw.rectangle((cx - q, cy - q, cx + q, cy + q), fill=color)
    elif shape == "triangle":
        pts = [
            (cx + r * math.cos(a), cy - r * math.sin(a))
            for a in (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)
        ]
        # shift down so the triangle's bounding box is centered on (cx, cy)
        dy = r * 0.25
        draw.polygon([(x, y + dy) for x, y in pts], fill=color)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=color)
    elif shape == "cross":
        w = r * 0.38
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=color)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=color)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def scene_targets(scene: Scene, config: ShapesConfig) -> np.ndarray:
    """Per-cell attribute labels, shape (GRID * GRID, 3): color, shape, size indices, -1 where empty."""
    target = np.full((GRID * GRID, 3), -1, dtype=np.int64)
    for obj in scene.objects:
        cell = POSITIONS.index(obj.position)
        target[cell] = (
            config.colors.index(obj.color),
            config.shapes.index(obj.shape),
            config.sizes.index(obj.size),
        )
    return target


def scene_from_targets(target: np.ndarray, config: ShapesConfig) -> list[ShapeObject]:
    """Objects described by per-cell labels (the inverse of `scene_targets`, without the relation)."""
    objects = []
    for cell, (color, shape, size) in enumerate(np.asarray(target).tolist()):
        if color >= 0:
            objects.append(
                ShapeObject(config.colors[color], config.shapes[shape], config.sizes[size], POSITIONS[cell])
            )
    return objects


def matches_caption(objects: list[ShapeObject], scene: Scene) -> bool:
    """Whether detected objects show everything the scene's caption says.

    One object: exactly one detected, with the same color, shape, size and position. Two objects: exactly two
    detected, with the captioned colors, shapes and sizes, standing in the captioned relation (the caption does
    not fix their absolute cells).
    """
    if len(objects) != len(scene.objects):
        return False
    if len(scene.objects) == 1:
        return objects[0] == scene.objects[0]
    a, b = scene.objects
    for p, q in ((objects[0], objects[1]), (objects[1], objects[0])):
        if (
            p.describe() == a.describe()
            and q.describe() == b.describe()
            and relation_holds(scene.relation, p, q)
        ):
            return True
    return False
