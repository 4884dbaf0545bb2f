"""Synthetic insects: a procedural, seeded image source for any taxonomy, in which every rank leaves its own trace.

Each class owns some visual *traits* and each trait belongs to exactly one rank:

* top rank → base colour (hue and darkness) and body plan (beetle, bee/fly, wasp, moth proportions);
* intermediate ranks → shape: wing form, body form (elongation, waist), appendages (antennae, legs), thorax accent
  (with one intermediate rank it owns all four; with several they share them out round-robin; intermediate ranks
  beyond the fourth add no trait of their own);
* last rank → the marks on thorax and abdomen (bands, stripes, spots, checks, eyespot, chevrons, ...), their
  count and layout. Marks are dark or pale as the parent decides (a hue of their own would let a linear model on
  pixels read the species off the mean colour); siblings differ in the geometry of their marks.

A trait's *code* (which wing form, which pattern kind, ...) is drawn from a permutation seeded by
``(seed, rank, class name, trait)``; siblings (classes with the same parent) that would share a code are resolved
by probing, so sibling classes always differ in every trait they own (while there are enough codes). Appearance is
thus a function of the seed, the class name and its siblings in the taxonomy — never of the order in which images
are requested, so a training set and a test set rendered in separate calls agree. An *unseen* class (a name not in
the taxonomy, e.g. from :func:`unseen_species`) takes a code that no known class at its rank uses if one is free,
else one its known siblings do not use, while its higher-rank traits come from its real ancestors; unseen leaves
prefer mark patterns reserved for them (known leaves get those only in families larger than the common set).

Difficulty (demo tree, seed 0..7): a logistic regression on raw 32 px pixels reaches 0.32–0.49 species accuracy
(knowing the family alone would give 0.56 there), while ``small_cnn`` learns the species at 48 px in a few epochs.

Every image then gets its own nuisance variation from a per-sample RNG seeded by ``(seed, chain, index)``: pose
(any rotation, mirror), position, scale, small shape jitter, a cluttered background (gradient, blobs, stalks),
occasional occluding stalks, lighting (brightness, contrast, colour cast) and sensor noise. The insect is drawn at
twice the output size and downsampled, for anti-aliasing.

Pure PIL + NumPy; no torch, no ray.
"""

from __future__ import annotations

import colorsys
import hashlib
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from taxonet.taxonomy import Taxonomy

MIN_IMAGE_SIZE = 16
MAX_IMAGE_SIZE = 512
# Pose ranges. The insect's centre may land anywhere within ±(ROOM − 0.4·scale) of the image centre (a little of
# it may leave the frame): position jitter is what keeps a linear model on pixels from reading the pattern at the
# image centre, which rotation about the insect's own centre would leave in place.
_POSE_SCALE = (0.7, 0.95)
_POSE_ROOM = 0.56

# Number of distinct codes per trait (kinds × variants for the pattern). Variants only come into play when a
# parent has more children than kinds.
_TRAIT_KINDS = {
    "colour": 8,  # hue sectors; the variant picks a lighter/darker body
    "plan": 4,
    "wings": 6,
    "form": 4,
    "appendages": 4,
    "accent": 4,
    "pattern": 14,  # len(PATTERNS)
}
_TRAIT_VARIANTS = {"colour": 2, "pattern": 3}
_SHAPE_TRAITS = ("wings", "form", "appendages", "accent")
_TOP_TRAITS = ("colour", "plan")

#: Mark patterns of the last rank. Known classes draw from the common ones first; the reserved ones go to unseen
#: classes (and to known ones only in families with more children than common kinds), so an unseen species shows
#: marks that no known species has: its features are new, not a mix of known ones.
PATTERNS = (
    "bands", "stripes", "spots", "checks", "eyespot", "chevrons", "tip", "margins",  # common
    "plain", "zigzag", "speckle", "cross", "diagonal", "outline",  # reserved
)
_COMMON_PATTERNS = 8
# Patterns in one group look alike under rotation (e.g. bands and diagonal stripes); siblings get different groups
# while there are enough, so that sibling species stay easy to tell apart.
_PATTERN_GROUP = {
    "bands": 0, "chevrons": 0, "diagonal": 0,
    "stripes": 1, "margins": 1, "cross": 1, "zigzag": 1,
    "spots": 2, "eyespot": 2, "speckle": 2,
    "tip": 3, "checks": 3, "plain": 3, "outline": 3,
}
PLANS = ("beetle", "bee", "wasp", "moth")
WINGS = ("none", "narrow", "round", "delta", "four", "folded")


@dataclass(frozen=True)
class SyntheticSample:
    """One rendered image with its label chain (names per rank, top first) and its sample index."""

    image: Image.Image
    labels: tuple[str, ...]
    index: int


@dataclass(frozen=True)
class _Traits:
    """Resolved appearance of one leaf chain (class-level; per-sample jitter is applied at render time)."""

    body_rgb: tuple[int, int, int]
    dark_rgb: tuple[int, int, int]
    plan: int
    wings: int
    wing_rgba: tuple[int, int, int, int]
    elongation: float
    waist: float
    antenna_length: float
    antenna_club: bool
    leg_length: float
    accent_rgb: tuple[int, int, int]
    pattern: int
    pattern_rgb: tuple[int, int, int]
    pattern_count: int
    pattern_points: tuple[tuple[float, float], ...]  # layout in the unit square of the pattern surface


def _stable_int(*parts: object) -> int:
    """A 64-bit integer hash of ``parts`` that is the same in every process (unlike ``hash``)."""
    text = "\x1f".join(str(part) for part in parts)
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def _rng(*parts: object) -> np.random.Generator:
    return np.random.default_rng(_stable_int(*parts))


def _hsv(hue: float, saturation: float, value: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(hue % 1.0, min(max(saturation, 0.0), 1.0), min(max(value, 0.0), 1.0))
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def _too_close(trait: str, code: int, other: int) -> bool:
    """Whether two codes of ``trait`` would look alike: equal, or (colour) neighbouring hues of equal lightness."""
    if code == other:
        return True
    if trait == "pattern":
        return _PATTERN_GROUP[PATTERNS[code % len(PATTERNS)]] == _PATTERN_GROUP[PATTERNS[other % len(PATTERNS)]]
    if trait != "colour":
        return False
    kinds = _TRAIT_KINDS["colour"]
    if code // kinds != other // kinds:
        return False
    distance = abs(code % kinds - other % kinds)
    return min(distance, kinds - distance) < 2


def _level_traits(depth: int) -> list[tuple[str, ...]]:
    """Which traits each level owns, top level first."""
    if depth == 1:
        return [_TOP_TRAITS + _SHAPE_TRAITS + ("pattern",)]
    if depth == 2:
        return [_TOP_TRAITS + _SHAPE_TRAITS, ("pattern",)]
    middle = depth - 2
    owned: list[tuple[str, ...]] = [_TOP_TRAITS]
    for m in range(middle):
        owned.append(tuple(t for i, t in enumerate(_SHAPE_TRAITS) if i % middle == m))
    owned.append(("pattern",))
    return owned


class SyntheticInsects:
    """Renders insect images for the leaf chains of ``taxonomy`` (and for unseen chains under it).

    Args:
        taxonomy: any :class:`~taxonet.taxonomy.Taxonomy` (any depth, any rank names).
        image_size: side of the square RGB output in pixels (tested 32–128; default 48).
        seed: selects the class appearances and, with the sample index, every per-sample variation.
    """

    def __init__(self, taxonomy: Taxonomy, image_size: int = 48, seed: int = 0) -> None:
        if not isinstance(taxonomy, Taxonomy):
            raise TypeError(f"taxonomy must be a taxonet.taxonomy.Taxonomy, got {type(taxonomy).__name__}")
        if isinstance(image_size, bool) or not isinstance(image_size, int):
            raise TypeError(f"image_size must be an int, got {image_size!r}")
        if not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
            raise ValueError(f"image_size must be in {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE} pixels, got {image_size}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.taxonomy = taxonomy
        self.image_size = image_size
        self.seed = seed
        self._owned = _level_traits(taxonomy.depth)
        self._sibling_codes: dict[tuple[int, int, str], dict[str, int]] = {}
        self._level_codes: dict[tuple[int, str], frozenset[int]] = {}
        self._traits: dict[tuple[str, ...], _Traits] = {}
        self._outlier_patterns: dict[tuple[str, ...], int] = {}  # chains made by outlier_species → pattern code

    # ------------------------------------------------------------------ public API
    @property
    def chains(self) -> list[tuple[str, ...]]:
        """Every leaf chain of the taxonomy (names top-down), in leaf index order."""
        return [tuple(row) for row in self.taxonomy.rows()]

    def render(self, chain: Sequence[str], index: int) -> Image.Image:
        """Image number ``index`` of the class ``chain`` (names per rank, top first; unseen names allowed)."""
        chain = self._check_chain(chain)
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
            raise ValueError(f"index must be a non-negative int, got {index!r}")
        traits = self._resolve(chain)
        rng = np.random.default_rng([self.seed & 0xFFFFFFFFFFFFFFFF, _stable_int(*chain), int(index)])
        return _draw(traits, self.image_size, rng)

    def samples(
        self, n_per_class: int, chains: Iterable[Sequence[str]] | None = None, start_index: int = 0
    ) -> Iterator[SyntheticSample]:
        """``n_per_class`` images of every leaf chain (or of ``chains``), indices ``start_index`` onwards.

        Classes are interleaved (all classes' image ``i`` before any image ``i + 1``), so a consumer that stops
        early still has balanced classes. Use disjoint index ranges for training and test sets.
        """
        if isinstance(n_per_class, bool) or not isinstance(n_per_class, int) or n_per_class < 0:
            raise ValueError(f"n_per_class must be a non-negative int, got {n_per_class!r}")
        if isinstance(start_index, bool) or not isinstance(start_index, int) or start_index < 0:
            raise ValueError(f"start_index must be a non-negative int, got {start_index!r}")
        todo = self.chains if chains is None else [self._check_chain(c) for c in chains]
        for index in range(start_index, start_index + n_per_class):
            for chain in todo:
                yield SyntheticSample(self.render(chain, index), chain, index)

    def outlier_species(self, per_family: int) -> list[tuple[str, ...]]:
        """New leaf chains for outlier exposure, ``per_family`` under every parent of the last rank.

        "Bycatch": insects of a known family that are none of its known species, for training a model to doubt its
        last rank (``loss.outlier_weight``, labelled down to the parent only). Each wears a *common* mark pattern
        that its known siblings lack — marks that known species of other families do have — and never one of the
        reserved patterns :func:`unseen_species` gives to unseen species, so a model exposed to them has still never
        seen an unseen species' marks. Names are ``"<parent> bycatch <n>"``. Only this generator renders them with
        those marks (the choice is remembered here); the choice itself is seeded by ``seed`` and the taxonomy.
        """
        taxonomy = self.taxonomy
        if taxonomy.depth < 2:
            raise ValueError("outlier species need a parent rank: the taxonomy has a single rank")
        if isinstance(per_family, bool) or not isinstance(per_family, int) or per_family < 1:
            raise ValueError(f"per_family must be a positive int, got {per_family!r}")
        parent_level, leaf_level = taxonomy.depth - 2, taxonomy.depth - 1
        kinds = _TRAIT_KINDS["pattern"]
        known = set(taxonomy.names[leaf_level])
        chains: list[tuple[str, ...]] = []
        for parent_index, parent in enumerate(taxonomy.names[parent_level]):
            prefix = tuple(taxonomy.chain_names(parent_level, parent_index))
            sibling_kinds = {code % kinds for code in self._sibling_table(leaf_level, parent, "pattern").values()}
            order = [int(k) for k in _rng(self.seed, "outlier", parent).permutation(_COMMON_PATTERNS)]
            free = [k for k in order if k not in sibling_kinds] or order
            # More outliers than free kinds: further variants of the same kinds (other mark colours).
            codes = [k + kinds * v for v in range(_TRAIT_VARIANTS["pattern"]) for k in free]
            number = 0
            for i in range(per_family):
                number += 1
                while f"{parent} bycatch {number}" in known:
                    number += 1
                chain = prefix + (f"{parent} bycatch {number}",)
                self._outlier_patterns[chain] = codes[i % len(codes)]
                self._traits.pop(chain, None)
                chains.append(chain)
        return chains

    # ------------------------------------------------------------------ traits
    def _check_chain(self, chain: Sequence[str]) -> tuple[str, ...]:
        if isinstance(chain, str) or not isinstance(chain, Sequence):
            raise ValueError(f"a chain is a sequence of names, one per rank {list(self.taxonomy.ranks)}; got {chain!r}")
        chain = tuple(chain)
        if len(chain) != self.taxonomy.depth:
            raise ValueError(
                f"chain {list(chain)} has {len(chain)} names; expected {self.taxonomy.depth} "
                f"({', '.join(self.taxonomy.ranks)})"
            )
        for level, name in enumerate(chain):
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"chain {list(chain)}: {self.taxonomy.ranks[level]} name must be a non-empty string")
            if level and (level, name) in self.taxonomy:
                # A known class must sit under its real parent; otherwise the chain contradicts the taxonomy.
                parent = self.taxonomy.chain_names(level, self.taxonomy.index(level, name))[level - 1]
                if parent != chain[level - 1]:
                    raise ValueError(
                        f"chain {list(chain)}: {self.taxonomy.ranks[level]} {name!r} belongs to "
                        f"{self.taxonomy.ranks[level - 1]} {parent!r}, not {chain[level - 1]!r}"
                    )
        return chain

    def _preference(self, level: int, name: str, trait: str, unseen: bool = False) -> list[int]:
        """Codes in the order class ``name`` would like them (for patterns: common kinds first, or reserved)."""
        kinds = _TRAIT_KINDS[trait]
        order = [int(k) for k in _rng(self.seed, "code", self.taxonomy.ranks[level], name, trait).permutation(kinds)]
        if trait == "pattern":
            common = [k for k in order if k < _COMMON_PATTERNS]
            reserved = [k for k in order if k >= _COMMON_PATTERNS]
            order = reserved + common if unseen else common + reserved
        codes = [k + kinds * v for v in range(_TRAIT_VARIANTS.get(trait, 1)) for k in order]
        if trait == "pattern":  # a plain body has no marks to recolour: its variants would all look the same
            codes = [c for c in codes if c < kinds or PATTERNS[c % kinds] != "plain"]
        return codes

    def _known_siblings(self, level: int, parent: str | None) -> list[str]:
        taxonomy = self.taxonomy
        if level == 0:
            return list(taxonomy.names[0])
        if (level - 1, parent) not in taxonomy:
            return []
        return [taxonomy.names[level][i] for i in taxonomy.children(level - 1, taxonomy.index(level - 1, parent))]

    def _sibling_table(self, level: int, parent: str | None, trait: str) -> dict[str, int]:
        """Codes of the known classes under ``parent``: each takes its first preferred code not yet taken."""
        known_parent = parent is not None and (level - 1, parent) in self.taxonomy
        key = (level, self.taxonomy.index(level - 1, parent) if known_parent else -1, trait)
        table = self._sibling_codes.get(key)
        if table is None:
            rank = self.taxonomy.ranks[level]
            siblings = sorted(self._known_siblings(level, parent), key=lambda n: (_stable_int(self.seed, rank, n), n))
            table = {}
            for name in siblings:
                preference = self._preference(level, name, trait)
                taken = set(table.values())
                table[name] = next(
                    (c for c in preference if not any(_too_close(trait, c, t) for t in taken)),
                    next((c for c in preference if c not in taken), preference[0]),
                )
            self._sibling_codes[key] = table
        return table

    def _code(self, level: int, chain: tuple[str, ...], trait: str) -> int:
        if trait == "pattern" and chain in self._outlier_patterns:
            return self._outlier_patterns[chain]
        name = chain[level]
        parent = chain[level - 1] if level else None
        table = self._sibling_table(level, parent, trait)
        if name in table:
            return table[name]
        # Unseen class: prefer a code no known class of this rank has, then one its known siblings lack.
        used_by_level = self._level_codes.get((level, trait))
        if used_by_level is None:
            used_by_level = frozenset(self._code(level, tuple(self.taxonomy.chain_names(level, i)), trait)
                                      for i in range(self.taxonomy.num_classes(level)))
            self._level_codes[(level, trait)] = used_by_level
        preference = self._preference(level, name, trait, unseen=True)
        kinds = _TRAIT_KINDS[trait]
        used_kinds = {c % kinds for c in used_by_level}
        sibling_codes = set(table.values())
        sibling_kinds = {c % kinds for c in sibling_codes}

        def unlike_siblings(c: int) -> bool:
            return not any(_too_close(trait, c, s) for s in sibling_codes)

        for acceptable in (
            lambda c: c % kinds not in used_kinds and unlike_siblings(c),
            unlike_siblings,
            lambda c: c % kinds not in used_kinds,
            lambda c: c % kinds not in sibling_kinds,
            lambda c: c not in sibling_codes,
        ):
            found = next((c for c in preference if acceptable(c)), None)
            if found is not None:
                return found
        return preference[0]

    def _resolve(self, chain: tuple[str, ...]) -> _Traits:
        cached = self._traits.get(chain)
        if cached is not None:
            return cached
        codes: dict[str, int] = {}
        params: dict[str, np.random.Generator] = {}
        for level, traits in enumerate(self._owned):
            for trait in traits:
                codes[trait] = self._code(level, chain, trait)
                # Continuous details of a trait come from the owning class alone.
                params[trait] = _rng(self.seed, "detail", self.taxonomy.ranks[level], chain[level], trait)

        colour = params["colour"]
        hue = (codes["colour"] % _TRAIT_KINDS["colour"] + 0.5 + colour.uniform(-0.08, 0.08)) / _TRAIT_KINDS["colour"]
        dark_body = codes["colour"] >= _TRAIT_KINDS["colour"]
        saturation = colour.uniform(0.65, 0.9)
        value = colour.uniform(0.45, 0.55) if dark_body else colour.uniform(0.8, 0.95)
        body = _hsv(hue, saturation, value)
        dark = _hsv(hue, saturation * 0.8, value * 0.3)

        wing_detail = params["wings"]
        wing_tint = wing_detail.uniform(0.0, 0.35)
        wing_rgb = tuple(int(255 * (1 - wing_tint) + c * wing_tint) for c in body)
        wing_rgba = (*wing_rgb, int(wing_detail.uniform(150, 200)))

        form = codes["form"] % _TRAIT_KINDS["form"]
        form_detail = params["form"]
        elongation = (0.85, 1.25)[form % 2] * form_detail.uniform(0.95, 1.05)
        waist = (0.0, 0.05)[form // 2] * form_detail.uniform(0.9, 1.1)

        appendages = codes["appendages"] % _TRAIT_KINDS["appendages"]
        appendage_detail = params["appendages"]
        antenna_length = (0.14, 0.3)[appendages % 2] * appendage_detail.uniform(0.9, 1.1)
        leg_length = appendage_detail.uniform(0.12, 0.2)

        accent = codes["accent"] % _TRAIT_KINDS["accent"]
        # The thorax accent is a shade of the body colour, so it marks the family by lightness, not by a new hue.
        pale = _hsv(hue, saturation * 0.35, min(1.0, value * 1.25))
        accent_rgb = (body, dark, pale, _hsv(hue, saturation, value * 0.65))[accent]

        pattern = codes["pattern"] % _TRAIT_KINDS["pattern"]
        variant = codes["pattern"] // _TRAIT_KINDS["pattern"]
        pattern_detail = params["pattern"]
        # Marks are dark or pale on the first two variants (a hue of their own would let colour alone give a
        # species away); only crowded families (more siblings than kinds) also get marks in the opposite hue.
        # The base choice belongs to the parent, not the species: siblings must differ in the geometry of their
        # marks (which a linear model on pixels cannot see under random poses), and variants of a kind always differ.
        lightness_choice = 1 if dark_body else _stable_int(self.seed, "marks", *chain[:-1]) % 2
        pattern_rgb = (_hsv(hue, saturation * 0.6, 0.1), _hsv(0.13, 0.15, 0.97), _hsv(hue + 0.5, 0.85, 0.9))[
            (lightness_choice + variant) % 2 if variant < 2 else 2
        ]
        count_range = {"bands": (2, 4), "stripes": (1, 3), "spots": (2, 6), "chevrons": (2, 3), "speckle": (12, 18),
                       "diagonal": (2, 4), "checks": (2, 3), "eyespot": (1, 2)}.get(PATTERNS[pattern], (1, 1))
        count = int(pattern_detail.integers(count_range[0], count_range[1] + 1))
        points = _pattern_points(PATTERNS[pattern], count, pattern_detail)

        traits = _Traits(
            body_rgb=body, dark_rgb=dark, plan=codes["plan"] % _TRAIT_KINDS["plan"],
            wings=codes["wings"] % _TRAIT_KINDS["wings"], wing_rgba=wing_rgba, elongation=elongation, waist=waist,
            antenna_length=antenna_length, antenna_club=appendages >= 2, leg_length=leg_length, accent_rgb=accent_rgb,
            pattern=pattern, pattern_rgb=pattern_rgb, pattern_count=count, pattern_points=points,
        )
        self._traits[chain] = traits
        return traits


def _pattern_points(kind: str, count: int, rng: np.random.Generator) -> tuple[tuple[float, float], ...]:
    """Mark centres in the unit square of the pattern surface; left/right mirrored like real insects."""
    if kind == "spots":
        points: list[tuple[float, float]] = []
        if count % 2:
            points.append((0.5, float(rng.uniform(0.3, 0.75))))
        for _ in range(1000):  # rejection sampling of well-separated rows; a handful of tries in practice
            if len(points) >= count:
                break
            x, y = float(rng.uniform(0.62, 0.78)), float(rng.uniform(0.25, 0.85))
            if all(abs(y - q) > 0.17 for p, q in points if p != 0.5):
                points += [(x, y), (1 - x, y)]
        return tuple(points[:count])
    if kind == "speckle":
        return tuple((float(rng.uniform(0.15, 0.85)), float(rng.uniform(0.1, 0.92))) for _ in range(count))
    return ()


# ---------------------------------------------------------------------- drawing
_PLAN_SHAPES = {
    # head radius, thorax half-width/half-height, abdomen half-width/half-height (units of body length)
    0: (0.075, 0.15, 0.09, 0.23, 0.27),  # beetle: broad domed abdomen
    1: (0.095, 0.14, 0.11, 0.19, 0.23),  # bee/fly: big head, round thorax
    2: (0.08, 0.12, 0.1, 0.17, 0.26),  # wasp: pointed abdomen
    3: (0.07, 0.12, 0.1, 0.15, 0.3),  # moth: long abdomen
}


def _ellipse(draw: ImageDraw.ImageDraw, cx: float, cy: float, rx: float, ry: float, fill: object) -> None:
    draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=fill)


def _rotated(points: Sequence[tuple[float, float]], angle: float, cx: float, cy: float) -> list[tuple[float, float]]:
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in points]


def _wing_polygons(kind: int, cx: float, cy: float, unit: float, spread: float) -> list[list[tuple[float, float]]]:
    """Right-side wing outlines (the left side is mirrored by the caller) around the thorax centre."""
    if kind == 0:
        return []
    ellipse = [(math.cos(t), math.sin(t)) for t in np.linspace(0, 2 * math.pi, 20, endpoint=False)]

    def oval(length: float, width: float, angle: float, offset: float = 0.0) -> list[tuple[float, float]]:
        pts = [((x + 1) * length / 2 * unit, y * width / 2 * unit) for x, y in ellipse]
        pts = _rotated(pts, angle, 0, 0)
        return [(cx + x, cy + offset * unit + y) for x, y in pts]

    if kind == 1:  # narrow, swept back (flies)
        return [oval(0.5, 0.13, math.radians(35 + spread))]
    if kind == 2:  # broad and round (butterflies)
        return [oval(0.42, 0.34, math.radians(-25 + spread)), oval(0.32, 0.26, math.radians(45 + spread), 0.05)]
    if kind == 3:  # triangular delta (moths)
        tip = _rotated([(0.48 * unit, 0.0)], math.radians(50 + spread), 0, 0)[0]
        front = _rotated([(0.36 * unit, 0.0)], math.radians(5 + spread), 0, 0)[0]
        return [[(cx, cy - 0.03 * unit), (cx + front[0], cy + front[1]), (cx + tip[0], cy + tip[1]),
                 (cx + 0.02 * unit, cy + 0.12 * unit)]]
    if kind == 4:  # two pairs spread sideways (dragonflies)
        return [oval(0.46, 0.1, math.radians(-8 + spread / 2)), oval(0.42, 0.1, math.radians(18 + spread / 2), 0.05)]
    # folded: long wings lying over the abdomen in a narrow V
    return [oval(0.55, 0.16, math.radians(72 + spread / 3), 0.02)]


def _draw_insect(t: _Traits, size: int, rng: np.random.Generator) -> Image.Image:
    """The insect in its canonical pose (head up, centred) as an RGBA image of ``size`` pixels."""
    layer = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    head_r, thorax_w, thorax_h, abdomen_w, abdomen_h = _PLAN_SHAPES[t.plan]
    elongation = t.elongation * rng.uniform(0.96, 1.04)
    abdomen_h *= elongation
    abdomen_w /= math.sqrt(elongation)
    waist = t.waist + (0.035 if t.plan == 2 else 0.0)
    length = 2 * head_r + 2 * thorax_h + waist + 2 * abdomen_h
    unit = 0.74 * size / length  # pixels per body-length unit: the body spans ~74 % of the canvas
    cx = size / 2
    top = size / 2 - length * unit / 2
    head_y = top + head_r * unit
    thorax_y = head_y + (head_r + thorax_h * 0.85) * unit
    abdomen_y = thorax_y + (thorax_h + waist + abdomen_h) * unit
    line = max(1, round(size / 48))

    # Wings first (translucent, under the body), mirrored left/right.
    spread = float(rng.uniform(-8, 8))
    for polygon in _wing_polygons(t.wings, cx, thorax_y, unit, spread):
        draw.polygon(polygon, fill=t.wing_rgba)
        draw.polygon([(2 * cx - x, y) for x, y in polygon], fill=t.wing_rgba)

    # Legs (three pairs from the thorax) and antennae, as dark lines.
    for pair, base_angle in enumerate((-40.0, 5.0, 45.0)):
        angle = math.radians(base_angle + rng.uniform(-12, 12))
        y0 = thorax_y + (pair - 1) * thorax_h * 0.6 * unit
        reach = t.leg_length * unit * 1.6
        knee = (thorax_w * unit + reach * 0.55 * math.cos(angle), reach * 0.55 * math.sin(angle))
        foot = (knee[0] + reach * 0.5 * math.cos(angle + 0.6), knee[1] + reach * 0.5 * math.sin(angle + 0.6))
        for sign in (1, -1):
            draw.line([(cx, y0), (cx + sign * knee[0], y0 + knee[1]), (cx + sign * foot[0], y0 + foot[1])],
                      fill=t.dark_rgb, width=line)
    antenna_angle = math.radians(60 + rng.uniform(-10, 10))
    for sign in (1, -1):
        tip = (cx + sign * math.cos(antenna_angle) * t.antenna_length * unit * 1.6,
               head_y - math.sin(antenna_angle) * t.antenna_length * unit * 1.6)
        draw.line([(cx, head_y), tip], fill=t.dark_rgb, width=line)
        if t.antenna_club:
            _ellipse(draw, tip[0], tip[1], 1.6 * line, 1.6 * line, t.dark_rgb)

    # Body: head, thorax, abdomen (the pattern surface is thorax + abdomen).
    surface = Image.new("L", (size, size), 0)
    surface_draw = ImageDraw.Draw(surface)
    _ellipse(draw, cx, head_y, head_r * unit, head_r * unit, t.dark_rgb)
    _ellipse(draw, cx, thorax_y, thorax_w * unit, thorax_h * unit, t.accent_rgb)
    _ellipse(surface_draw, cx, thorax_y, thorax_w * unit, thorax_h * unit, 255)
    if waist > 0:
        draw.line([(cx, thorax_y), (cx, abdomen_y)], fill=t.dark_rgb, width=2 * line)
    if t.plan == 2:  # wasp: a teardrop abdomen ending in a point
        pts = [(cx + abdomen_w * unit * math.sin(a) * (1 - 0.35 * max(0.0, math.cos(a + math.pi))),
                abdomen_y - abdomen_h * unit * math.cos(a)) for a in np.linspace(0, 2 * math.pi, 24, endpoint=False)]
        draw.polygon(pts, fill=t.body_rgb)
        surface_draw.polygon(pts, fill=255)
    else:
        _ellipse(draw, cx, abdomen_y, abdomen_w * unit, abdomen_h * unit, t.body_rgb)
        _ellipse(surface_draw, cx, abdomen_y, abdomen_w * unit, abdomen_h * unit, 255)
    if t.plan == 0:  # beetle: the seam between the elytra
        draw.line([(cx, abdomen_y - abdomen_h * unit), (cx, abdomen_y + abdomen_h * unit)], fill=t.dark_rgb, width=line)
    if t.plan == 1:  # bee/fly: big eyes
        for sign in (1, -1):
            _ellipse(draw, cx + sign * head_r * unit * 0.6, head_y, head_r * unit * 0.45, head_r * unit * 0.55,
                     (20, 20, 20))

    # Pattern marks, clipped to the surface, in the surface's bounding box (x0..x1, y0..y1).
    x0, x1 = cx - max(thorax_w, abdomen_w) * unit, cx + max(thorax_w, abdomen_w) * unit
    y0, y1 = thorax_y - thorax_h * unit, abdomen_y + abdomen_h * unit
    marks = Image.new("L", (size, size), 0)
    _draw_pattern(ImageDraw.Draw(marks), t, x0, y0, x1 - x0, y1 - y0)
    if PATTERNS[t.pattern] == "outline":
        rim = 2 * max(1, round(size / 64)) + 1
        marks = ImageChops.subtract(surface, surface.filter(ImageFilter.MinFilter(rim)))
    layer.paste((*t.pattern_rgb, 255), mask=ImageChops.multiply(marks, surface))
    return layer


def _draw_pattern(draw: ImageDraw.ImageDraw, t: _Traits, x0: float, y0: float, w: float, h: float) -> None:
    kind, n = PATTERNS[t.pattern], t.pattern_count

    def box(u0: float, v0: float, u1: float, v1: float) -> None:
        draw.rectangle((x0 + u0 * w, y0 + v0 * h, x0 + u1 * w, y0 + v1 * h), fill=255)

    def dot(u: float, v: float, r: float) -> None:
        _ellipse(draw, x0 + u * w, y0 + v * h, r * w, r * w, 255)

    if kind == "bands":  # transverse bands
        for j in range(n):
            v = 0.22 + 0.7 * (j + 0.5) / n
            box(0, v - 0.28 / n, 1, v + 0.28 / n - 0.06)
    elif kind == "stripes":  # longitudinal stripes
        for j in range(n):
            u = (j + 1) / (n + 1)
            box(u - 0.1, 0, u + 0.1, 1)
    elif kind == "spots":
        for u, v in t.pattern_points:
            dot(u, v, 0.15)
    elif kind == "checks":
        rows, cols = 2 * n, 2
        for r in range(rows):
            for c in range(cols):
                if (r + c) % 2 == 0:
                    box(c / cols, r / rows, (c + 1) / cols, (r + 1) / rows)
    elif kind == "eyespot":
        centres = [(0.5, 0.62)] if n == 1 else [(0.3, 0.6), (0.7, 0.6)]
        radius = 0.3 if n == 1 else 0.2
        for u, v in centres:
            dot(u, v, radius)
            _ellipse(draw, x0 + u * w, y0 + v * h, radius * 0.55 * w, radius * 0.55 * w, 0)
            dot(u, v, radius * 0.22)
    elif kind == "chevrons":
        width = max(2, round(h * 0.09))
        for j in range(n):
            v = 0.3 + 0.6 * j / max(1, n)
            draw.line([(x0, y0 + v * h), (x0 + 0.5 * w, y0 + (v + 0.16) * h), (x0 + w, y0 + v * h)],
                      fill=255, width=width)
    elif kind == "tip":
        box(0, 0.62, 1, 1)
        box(0, 0, 1, 0.12)
    elif kind == "diagonal":
        width = max(2, round(w * 0.2))
        for j in range(n + 1):
            v = (j + 0.5) / (n + 0.5) * 1.3 - 0.15
            draw.line([(x0, y0 + v * h), (x0 + w, y0 + (v - 0.35) * h)], fill=255, width=width)
    elif kind == "speckle":
        for u, v in t.pattern_points:
            dot(u, v, 0.06)
    elif kind == "cross":
        box(0.4, 0, 0.6, 1)
        box(0, 0.45, 1, 0.6)
    elif kind == "zigzag":  # one thick zigzag down the body
        points = [(x0 + (0.2 if j % 2 else 0.8) * w, y0 + j / 5 * h) for j in range(6)]
        draw.line(points, fill=255, width=max(2, round(w * 0.18)), joint="curve")
    elif kind == "outline":  # a rim around the body, drawn by _draw_insect from the surface mask
        pass
    elif kind == "margins":
        box(0, 0, 0.3, 1)
        box(0.7, 0, 1, 1)
    # "plain": no marks


def _background(size: int, rng: np.random.Generator) -> Image.Image:
    """A gradient with blobs and stalks: the clutter of a camera-trap or flower background."""
    start = np.array(_hsv(rng.random(), rng.uniform(0.05, 0.5), rng.uniform(0.35, 0.9)), dtype=np.float32)
    stop = np.array(_hsv(rng.random(), rng.uniform(0.05, 0.5), rng.uniform(0.35, 0.9)), dtype=np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    along = (math.cos(angle) * ramp[None, :] + math.sin(angle) * ramp[:, None]) * 0.5 + 0.5
    pixels = start + (stop - start) * np.clip(along, 0, 1)[..., None]
    image = Image.fromarray(pixels.astype(np.uint8), "RGB").convert("RGBA")
    clutter = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(clutter)
    for _ in range(int(rng.integers(2, 7))):
        rx, ry = rng.uniform(0.04, 0.25, size=2) * size
        x, y = rng.uniform(0, size, size=2)
        colour = _hsv(rng.random(), rng.uniform(0.1, 0.6), rng.uniform(0.3, 0.95))
        draw.ellipse((x - rx, y - ry, x + rx, y + ry), fill=(*colour, int(rng.integers(60, 170))))
    _stalks(draw, size, rng, int(rng.integers(1, 5)))
    return Image.alpha_composite(image, clutter)


def _stalks(draw: ImageDraw.ImageDraw, size: int, rng: np.random.Generator, count: int) -> None:
    for _ in range(count):
        x, y = rng.uniform(0, size, size=2)
        angle = rng.uniform(0, math.pi)
        half = rng.uniform(0.3, 0.8) * size
        dx, dy = math.cos(angle) * half, math.sin(angle) * half
        colour = _hsv(rng.uniform(0.15, 0.4), rng.uniform(0.2, 0.7), rng.uniform(0.25, 0.8))
        draw.line([(x - dx, y - dy), (x + dx, y + dy)], fill=(*colour, 220), width=max(1, int(rng.integers(1, 4))))


def _draw(t: _Traits, image_size: int, rng: np.random.Generator) -> Image.Image:
    canvas = 2 * image_size  # drawn at 2× and downsampled: anti-aliasing for the price of one reduce()
    background = _background(canvas, rng)
    insect = _draw_insect(t, canvas, rng)
    if rng.random() < 0.5:
        insect = insect.transpose(Image.Transpose.FLIP_LEFT_RIGHT)

    # Pose: rotate by any angle, scale, and move; PIL's AFFINE maps output pixels back to input pixels.
    angle = rng.uniform(0, 2 * math.pi)
    scale = rng.uniform(*_POSE_SCALE)
    room = max(0.03, _POSE_ROOM - 0.4 * scale) * canvas
    shift_x, shift_y = rng.uniform(-room, room, size=2)
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    centre = canvas / 2
    ox, oy = centre + shift_x, centre + shift_y
    matrix = (cos, sin, centre - cos * ox - sin * oy, -sin, cos, centre + sin * ox - cos * oy)
    insect = insect.transform((canvas, canvas), Image.Transform.AFFINE, matrix, resample=Image.Resampling.BILINEAR)
    composed = Image.alpha_composite(background, insect)
    if rng.random() < 0.3:  # a stalk in front of the insect: partial occlusion
        overlay = Image.new("RGBA", (canvas, canvas), (0, 0, 0, 0))
        _stalks(ImageDraw.Draw(overlay), canvas, rng, 1)
        composed = Image.alpha_composite(composed, overlay)
    small = composed.convert("RGB").reduce(2)

    # Lighting (brightness, contrast, colour cast) and sensor noise, on the final pixels.
    pixels = np.asarray(small, dtype=np.float32)
    contrast = rng.uniform(0.65, 1.15)
    brightness = rng.uniform(-35, 35)
    cast = rng.uniform(0.9, 1.1, size=3).astype(np.float32)
    mean = pixels.mean()
    pixels = (pixels - mean) * contrast + mean + brightness
    pixels = pixels * cast + rng.normal(0.0, rng.uniform(2, 8), size=pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8), "RGB")


# ---------------------------------------------------------------------- helpers for tests and demos
def synthetic_taxonomy(
    orders: int = 3,
    families_per_order: int | Sequence[int] = (2, 2, 1),
    species_per_family: int | Sequence[int] = (3, 2, 2, 3, 2),
    ranks: Sequence[str] = ("order", "family", "species"),
) -> Taxonomy:
    """A made-up three-rank tree: "Ordo A" → "Familia A1" → "Species A1a", ...

    ``families_per_order`` is one count for all orders or one per order; ``species_per_family`` is one count for
    all families or one per family (in order A's families first). The default has 3 orders, 5 families and
    12 species.
    """
    if isinstance(orders, bool) or not isinstance(orders, int) or not 1 <= orders <= 26:
        raise ValueError(f"orders must be an int in 1..26, got {orders!r}")
    if len(tuple(ranks)) != 3:
        raise ValueError(f"synthetic_taxonomy builds three ranks; got ranks {list(ranks)}")
    families = _counts("families_per_order", families_per_order, orders)
    species = _counts("species_per_family", species_per_family, sum(families))
    rows: list[tuple[str, str, str]] = []
    family_number = 0
    for o in range(orders):
        letter = chr(ord("A") + o)
        for f in range(families[o]):
            for s in range(species[family_number]):
                rows.append((f"Ordo {letter}", f"Familia {letter}{f + 1}", f"Species {letter}{f + 1}{_suffix(s)}"))
            family_number += 1
    return Taxonomy.from_rows(rows, ranks)


def _counts(what: str, value: int | Sequence[int], expected: int) -> list[int]:
    counts = [value] * expected if isinstance(value, int) and not isinstance(value, bool) else list(value)
    if len(counts) != expected:
        raise ValueError(f"{what} needs {expected} counts, got {len(counts)}: {counts}")
    bad = [c for c in counts if isinstance(c, bool) or not isinstance(c, int) or c < 1]
    if bad:
        raise ValueError(f"{what} must be positive ints, got {counts}")
    return counts


def _suffix(number: int) -> str:
    """0 → "a", 25 → "z", 26 → "ba": a letter suffix for species names."""
    letters = ""
    while True:
        letters = chr(ord("a") + number % 26) + letters
        number //= 26
        if number == 0:
            return letters


def unseen_species(taxonomy: Taxonomy, per_family: int = 1, seed: int = 0) -> list[tuple[str, ...]]:
    """New leaf chains, ``per_family`` under every parent of the last rank ("Apidae sp. novum 1", ...).

    Rendered by ``SyntheticInsects(taxonomy, seed=seed)``, each new leaf carries a pattern code that none of its
    known siblings has (and, where the code space allows, that differs from the other new leaves of the same
    parent), while its higher ranks keep their real traits — a model trained on the known leaves should be unsure
    at the last rank and right above it.
    """
    if taxonomy.depth < 2:
        raise ValueError("unseen species need a parent rank: the taxonomy has a single rank")
    if isinstance(per_family, bool) or not isinstance(per_family, int) or per_family < 1:
        raise ValueError(f"per_family must be a positive int, got {per_family!r}")
    generator = SyntheticInsects(taxonomy, seed=seed)
    parent_level, leaf_level = taxonomy.depth - 2, taxonomy.depth - 1
    known = set(taxonomy.names[leaf_level])
    chains: list[tuple[str, ...]] = []
    for parent_index, parent in enumerate(taxonomy.names[parent_level]):
        prefix = tuple(taxonomy.chain_names(parent_level, parent_index))
        kinds = _TRAIT_KINDS["pattern"]
        taken: set[int] = set()  # pattern kinds of the new leaves made so far for this parent
        number, made, fallback = 0, 0, []
        # Try numbered names until each new leaf has a pattern kind of its own; else use the first names tried.
        # (Every new leaf already differs from its known siblings: see SyntheticInsects._code.)
        while made < per_family and number < per_family + 50:
            number += 1
            name = f"{parent} sp. novum {number}"
            if name in known:
                continue
            kind = generator._code(leaf_level, prefix + (name,), "pattern") % kinds
            if kind in taken:
                fallback.append(name)
                continue
            taken.add(kind)
            chains.append(prefix + (name,))
            made += 1
        chains.extend(prefix + (name,) for name in fallback[: per_family - made])
    return chains


def to_arrays(samples: Iterable[SyntheticSample]) -> tuple[np.ndarray, list[tuple[str, ...]]]:
    """Stack samples into ``uint8 [N, H, W, 3]`` and the list of their label chains."""
    images, labels = [], []
    for sample in samples:
        images.append(np.asarray(sample.image.convert("RGB"), dtype=np.uint8))
        labels.append(sample.labels)
    if not images:
        return np.zeros((0, 0, 0, 3), dtype=np.uint8), []
    return np.stack(images), labels


def write_image_folder(root: str | Path, samples: Iterable[SyntheticSample], fmt: str = "jpg") -> list[Path]:
    """Write ``root/ORDER/FAMILY/SPECIES/<index>.<fmt>`` (one folder level per rank); returns the paths written."""
    formats = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG"}
    if fmt.lower() not in formats:
        raise ValueError(f"fmt must be one of {sorted(formats)}, got {fmt!r}")
    root = Path(root)
    written: list[Path] = []
    for sample in samples:
        for name in sample.labels:
            if "/" in name or "\\" in name or name in (".", ".."):
                raise ValueError(f"label {name!r} cannot be a folder name")
        folder = root.joinpath(*sample.labels)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{sample.index}.{fmt.lower()}"
        options = {"quality": 95} if formats[fmt.lower()] == "JPEG" else {}
        sample.image.save(path, format=formats[fmt.lower()], **options)
        written.append(path)
    return written
