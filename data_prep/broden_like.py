"""A procedural Broden-like probe set: the real Broden's shape and long tail, with planted ground truth.

Profiles (``python -m data_prep synthetic --profile NAME``; ``PROFILES``):

- ``demo`` (the default, 3,000 images): a small catalogue a small CNN learns in
  minutes on two cores, with Broden-like coverage: no concept covers more than
  ``DEMO_COVERAGE_BOUND`` (5%) of all mask pixels (whole-image labels count as
  covering their whole images), so the dissection's IoU cap
  ``0.005 / coverage`` (a unit fires on 0.5% of the pixels) stays above the
  0.04 detector threshold for every concept.
- ``broden-scale`` (63,305 images, as many as the real Broden): the real set's
  label counts per category and a Zipf-like long tail, so a few concepts are
  common and most cover well under 1% of all pixels.
- ``basic``: the original generator, ``data_prep.synthetic_broden`` (39 labels),
  kept unchanged for the tests and the planted models.

Catalogue (``catalogue(profile)``; fixed by the profile, never by the seed):

========== ======= ============= ==============================================
category   demo    broden-scale  what it is
========== ======= ============= ==============================================
color      11      11            the 11 Broden colours (``synthetic_broden.COLORS``)
object     24      580           a shape family (disc, square, triangle, pentagon,
                                 hexagon, octagon, 4/5/6-point stars, ring, cross,
                                 crescent, squircle, diamond, frame, half-disc,
                                 trapezoid, tee, ell, lens, flower, hourglass) x
                                 a variant (aspect/rotation: plain, tall, wide,
                                 slant) x a fill pattern (solid, stripes at 0/45/
                                 90/135 degrees, dots, checks, rings, grid, halves,
                                 wedges); named ``<shape>[-<variant>]-<pattern>``
part       12      230           sub-regions of 6 (demo) / 100 (broden-scale)
                                 objects with 2-3 parts each (top/bottom,
                                 left/right, rim/core, cap/body, top/band/bottom,
                                 left/middle/right); named ``<object>-<part>``, so
                                 a part label belongs to its object
material   24      30            the three scikit-image photos (brick, grass,
                                 gravel) and band-pass filtered noise of distinct
                                 frequency, orientation and tint (``<tint>-<grain>
                                 [-<orientation>]``), each a periodic tile of twice
                                 the image side computed once per process and cropped
scene      32      470           a layout (horizon at three heights, vertical,
                                 diagonal, antidiagonal, three bands, three
                                 columns, centre box, centre disc, quadrants, wave,
                                 tilted horizon, corner) with one material per
                                 region; named ``<layout>_<material>_<material>...``
texture    10      47            two-colour whole-image patterns: 17 families
                                 (stripes in 4 directions, checks, diamonds, dots,
                                 polka, grid, crosshatch, zigzag, waves, concentric,
                                 brick, triangles, plaid, spiral) x period (fine,
                                 medium, coarse); named ``<family>-<period>``
========== ======= ============= ==============================================

Images (``plan_image(profile, seed, i, size)`` depends only on the profile, the
seed and ``i``; ``render(plan)`` draws it): ``TEXTURE_SHARE`` (20%) are texture
images (the whole image one texture in two random distinct colours; masks:
colour only), the rest scene images: the scene's layout with small random
variation (boundary offset, wave phase, tile crop offsets), its materials
filling the regions (material mask; material pixels carry no colour label),
and 1-3 objects on top at random positions, sizes and small rotations, later
ones occluding earlier ones. An object is painted in a base colour and, where
its pattern is on, an accent colour; an object with parts has one base colour
per part. Masks: colour (painted pixels by colour), object (visible object
pixels), part (one layer per visible object with parts), material (visible
material pixels). Every image has exactly one scene or texture label.

The coverage law: classes are drawn with Zipf-like weights ``(rank + 1) **
-exponent`` in catalogue order (``Profile.zipf``: 1.0 for the objects, scenes
and textures of broden-scale; 0.5 / 0.1 / 0.3 for demo, which only mildly
favours its first classes); materials follow their scenes (demo: each scene
region takes the material with the least expected coverage so far, so the
materials are balanced), parts their objects, colours are uniform. The demo
catalogue's material and scene counts were chosen by measuring the coverage:
on 3,000 demo images the largest concept covers 3.9% (a material), the
largest object 1.9%; tests/test_broden_like.py checks the 5% bound.

Files, tables and the build follow ``data_prep.broden_build``: JPEG quality
``JPEG_QUALITY`` (4:4:4), masks at half resolution (nearest-neighbour samples of
the full-resolution label maps, as in ``synthetic_broden``) as PNGs with zlib
level 1, ``synthetic.json`` with ``build_params`` (format version, profile,
n_images, size, seed), built in chunks of images in a pool of ``workers``
processes into ``<root>.partial``: a killed build resumes with its finished
chunks (same parameters) or starts over with a log line (other parameters);
``<root>`` appears only when complete.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

from data_prep.broden_build import ImageRecord, build, image_stem, params_match, write_image_files
from data_prep.synthetic_broden import COLORS, MATERIAL_TINTS, mask_size, to_mask_resolution
from dissect.broden import IMAGE_CATEGORIES, PIXEL_CATEGORIES

FORMAT_VERSION = 1
TEXTURE_SHARE = 0.2
VAL_EVERY = 5
NOISE_SIGMA = 4.0
JPEG_QUALITY = 90
PNG_COMPRESS_LEVEL = 1
DEMO_COVERAGE_BOUND = 0.05
"""No demo concept covers more than this share of all mask pixels."""
CATALOGUE_SEED = 20170721
"""Seeds the choice of classes in the broden-scale catalogue (never the data seed)."""

SHAPES = ("disc", "square", "triangle", "pentagon", "hexagon", "octagon", "star4", "star5", "star6", "ring",
          "cross", "crescent", "squircle", "diamond", "frame", "halfdisc", "trapezoid", "tee", "ell", "lens",
          "flower", "hourglass")
HOLLOW_SHAPES = ("ring", "frame", "crescent")
"""Shapes whose shrunken copy does not lie inside them: no rim/core parts."""
VARIANTS: dict[str, tuple[float, float]] = {"plain": (1.0, 0.0), "tall": (0.6, 0.0), "wide": (0.6, 90.0),
                                            "slant": (0.7, 45.0)}
"""variant -> (aspect: width / height, rotation in degrees)."""
PATTERNS = ("solid", "stripes0", "stripes45", "stripes90", "stripes135", "dots", "checks", "rings", "grid",
            "halves", "wedges")
PATTERN_PERIOD = 0.5
"""Fill pattern period in units of the object radius."""
PART_SCHEMES: tuple[tuple[str, ...], ...] = (("top", "bottom"), ("rim", "core"), ("left", "right"), ("cap", "body"),
                                             ("top", "band", "bottom"), ("left", "middle", "right"))
LAYOUTS: dict[str, int] = {"horizon-high": 2, "horizon": 2, "horizon-low": 2, "vertical": 2, "diagonal": 2,
                           "antidiagonal": 2, "bands": 3, "columns": 3, "box": 2, "disc": 2, "quadrants": 2,
                           "wave": 2, "tilted": 2, "corner": 2}
"""Scene layout -> number of regions."""
TINTS: dict[str, tuple[int, int, int]] = {
    "ochre": (190, 150, 80), "slate": (110, 125, 150), "moss": (105, 140, 75), "rust": (165, 85, 55),
    "sand": (215, 195, 150), "teal": (70, 145, 145), "plum": (135, 85, 130), "charcoal": (85, 85, 90),
    "clay": (200, 125, 100), "ivory": (225, 220, 195),
}
GRAINS: dict[str, float] = {"blotch": 3.0, "mottle": 6.0, "grain": 12.0, "speck": 24.0}
"""Noise grain -> centre frequency in cycles per image side."""
ORIENTATIONS: dict[str, float | None] = {"": None, "h": 0.0, "d": 45.0, "v": 90.0, "a": 135.0}
"""Noise orientation suffix -> streak direction in degrees (None: isotropic)."""
PHOTOS = ("brick", "grass", "gravel")
TEXTURE_FAMILIES = ("striped-h", "striped-v", "striped-d", "striped-a", "chequered", "diamond", "dotted", "polka",
                    "grid", "crosshatched", "zigzagged", "wavy", "concentric", "brick", "triangles", "plaid",
                    "spiral")
TEXTURE_PERIODS: dict[str, float] = {"fine": 1 / 14, "medium": 1 / 8, "coarse": 1 / 4.5}
"""Texture period word -> period as a fraction of the image side."""


@dataclass(frozen=True)
class ObjectClass:
    """A shape family, variant and fill pattern; ``parts`` names its sub-regions (empty: no parts)."""

    name: str
    shape: str
    variant: str
    pattern: str
    parts: tuple[str, ...]


@dataclass(frozen=True)
class MaterialClass:
    """A photo (``grain`` is the photo's name) or filtered noise of a grain, orientation and tint."""

    name: str
    grain: str
    orientation: str
    tint: str


@dataclass(frozen=True)
class SceneClass:
    """A layout and the material (index into the catalogue's materials) of each of its regions."""

    name: str
    layout: str
    materials: tuple[int, ...]


@dataclass(frozen=True)
class TextureClass:
    """A texture family at a period (fraction of the image side)."""

    name: str
    family: str
    period: float


@dataclass(frozen=True)
class Profile:
    """The sizes and sampling laws of one profile."""

    name: str
    n_images: int
    n_objects: int
    n_part_objects: int
    n_parts: int
    n_materials: int
    n_scenes: int
    n_textures: int
    zipf: dict[str, float]
    """category (object, scene, texture) -> Zipf exponent of the class weights."""
    objects_per_image: tuple[int, int]
    radius: tuple[float, float]
    """Object radius range (fraction of the image side), sampled log-uniformly."""


PROFILES: dict[str, Profile] = {
    "demo": Profile("demo", 3000, n_objects=24, n_part_objects=6, n_parts=12, n_materials=24, n_scenes=32,
                    n_textures=10, zipf={"object": 0.5, "scene": 0.1, "texture": 0.3}, objects_per_image=(1, 3),
                    radius=(0.14, 0.24)),
    "broden-scale": Profile("broden-scale", 63305, n_objects=580, n_part_objects=100, n_parts=230, n_materials=30,
                            n_scenes=470, n_textures=47, zipf={"object": 1.0, "scene": 1.0, "texture": 1.0},
                            objects_per_image=(1, 3), radius=(0.06, 0.24)),
}
ALL_PROFILES = ("demo", "broden-scale", "basic")
"""Every profile of ``python -m data_prep synthetic``; ``basic`` is ``data_prep.synthetic_broden``."""
DEFAULT_PROFILE = "demo"


@dataclass(frozen=True)
class Catalogue:
    """Every class of a profile and the label numbers: ``labels[k]`` is the (name, category) of number k + 1."""

    profile: Profile
    objects: tuple[ObjectClass, ...]
    materials: tuple[MaterialClass, ...]
    scenes: tuple[SceneClass, ...]
    textures: tuple[TextureClass, ...]
    labels: tuple[tuple[str, str], ...]
    first_number: dict[str, int]
    """category -> label number of its first class (colours start at 1)."""
    part_numbers: tuple[tuple[int, ...], ...]
    """Per object class, the label numbers of its parts."""
    weights: dict[str, np.ndarray]
    """category (object, scene, texture) -> cumulative sampling weights (ending at 1)."""

    def count(self, category: str) -> int:
        """Number of labels of ``category``."""
        return sum(1 for _, c in self.labels if c == category)


def object_name(shape: str, variant: str, pattern: str) -> str:
    """``<shape>[-<variant>]-<pattern>`` (the plain variant is not named)."""
    return "-".join([shape] + ([variant] if variant != "plain" else []) + [pattern])


def part_schemes(objects: list[tuple[str, str, str]], n_part_objects: int, n_parts: int) -> dict[int, tuple[str, ...]]:
    """Object index -> part names for ``n_part_objects`` objects spread evenly over the catalogue, ``n_parts`` in all.

    The first objects get 3 parts until the total fits, the rest 2; rim/core is not given to hollow shapes.
    """
    n_three = n_parts - 2 * n_part_objects
    if not 0 <= n_three <= n_part_objects:
        raise ValueError(f"{n_parts} parts cannot be split as 2-3 parts over {n_part_objects} objects")
    step = len(objects) / n_part_objects
    chosen = [int(k * step) for k in range(n_part_objects)]
    two = [s for s in PART_SCHEMES if len(s) == 2]
    three = [s for s in PART_SCHEMES if len(s) == 3]
    schemes = {}
    for k, index in enumerate(chosen):
        scheme = three[k % len(three)] if k < n_three else two[k % len(two)]
        if scheme == ("rim", "core") and objects[index][0] in HOLLOW_SHAPES:
            scheme = ("top", "bottom")
        schemes[index] = scheme
    return schemes


def demo_objects() -> list[tuple[str, str, str]]:
    """(shape, variant, pattern) of the 24 demo objects: 12 distinct shapes, 2 patterns each."""
    shapes = ("disc", "square", "triangle", "star5", "ring", "cross", "crescent", "diamond", "hexagon", "frame",
              "tee", "flower")
    patterns = ("solid", "stripes0", "dots", "checks", "stripes90", "rings")
    return [(shape, "plain", patterns[(2 * k + j + k // 3) % len(patterns)]) for k, shape in enumerate(shapes)
            for j in range(2)]


def materials_of(profile: Profile) -> list[MaterialClass]:
    """The photos, then noise materials: every (grain, orientation) once before any repeats, tints cycling."""
    result = [MaterialClass(name, name, "", "") for name in PHOTOS]
    combos = [(g, o) for o in ORIENTATIONS for g in GRAINS]
    tints = list(TINTS)
    k = 0
    while len(result) < profile.n_materials:
        grain, orientation = combos[k % len(combos)]
        tint = tints[(k * 3 + k // len(combos)) % len(tints)]
        name = "-".join([tint, grain] + ([orientation] if orientation else []))
        result.append(MaterialClass(name, grain, orientation, tint))
        k += 1
    return result


def region_areas(layout: str) -> np.ndarray:
    """Share of the image of each region of ``layout`` without random variation, shape (regions,)."""
    y, x = pixel_grid(64)
    return np.bincount(layout_regions(layout, 0.0, 0.0, y, x).ravel(), minlength=LAYOUTS[layout]) / 64**2


def scenes_of(profile: Profile, materials: list[MaterialClass], rng: np.random.Generator) -> list[SceneClass]:
    """Layouts in turn, every scene distinct; materials drawn at random, or for demo balanced by expected area.

    Demo: each region (largest first) takes the material with the least expected coverage so far
    (region area x scene weight), so no material covers much more than the average.
    """
    layouts = list(LAYOUTS)
    result: list[SceneClass] = []
    seen: set[tuple[str, tuple[int, ...]]] = set()
    weights = np.diff(cumulative_weights(profile.n_scenes, profile.zipf["scene"]), prepend=0.0)
    load = np.zeros(len(materials))
    while len(result) < profile.n_scenes:
        layout = layouts[len(result) % len(layouts)]
        regions = LAYOUTS[layout]
        if profile.name == "demo":
            areas = region_areas(layout) * weights[len(result)]
            picks: dict[int, int] = {}
            for region in np.argsort(-areas, kind="stable"):
                free = [m for m in np.argsort(load, kind="stable") if m not in picks.values()]
                picks[int(region)] = int(free[0])
                load[free[0]] += areas[region]
            chosen = tuple(picks[region] for region in range(regions))
        else:
            chosen = tuple(int(m) for m in rng.choice(len(materials), size=regions, replace=False))
        if (layout, chosen) in seen:
            continue
        seen.add((layout, chosen))
        name = "_".join([layout] + [materials[m].name for m in chosen])
        result.append(SceneClass(name, layout, chosen))
    return result


def textures_of(profile: Profile) -> list[TextureClass]:
    """Demo: 10 families at the medium period; otherwise every family at every period, fine first, in order."""
    if profile.name == "demo":
        families = ("striped-h", "striped-d", "chequered", "dotted", "grid", "zigzagged", "wavy", "concentric",
                    "brick", "triangles")
        return [TextureClass(f"{family}-medium", family, TEXTURE_PERIODS["medium"]) for family in families]
    combos = [(family, word) for word in TEXTURE_PERIODS for family in TEXTURE_FAMILIES]
    order = np.random.default_rng(CATALOGUE_SEED + 1).permutation(len(combos))[: profile.n_textures]
    return [TextureClass(f"{combos[k][0]}-{combos[k][1]}", combos[k][0], TEXTURE_PERIODS[combos[k][1]])
            for k in sorted(order.tolist())]


def cumulative_weights(n: int, exponent: float) -> np.ndarray:
    """Cumulative Zipf-like weights (rank + 1) ** -exponent of n classes, normalised to end at 1, shape (n,)."""
    weights = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    cumulative = np.cumsum(weights / weights.sum())
    cumulative[-1] = 1.0
    return cumulative


@functools.lru_cache(maxsize=None)
def catalogue(profile_name: str) -> Catalogue:
    """The catalogue of a profile (see the module docstring); raises ValueError for an unknown profile."""
    profile = profile_by_name(profile_name)
    rng = np.random.default_rng(CATALOGUE_SEED)
    if profile.name == "demo":
        combos = demo_objects()
    else:
        everything = [(s, v, p) for s in SHAPES for v in VARIANTS for p in PATTERNS]
        combos = [everything[k] for k in rng.permutation(len(everything))[: profile.n_objects]]
    schemes = part_schemes(combos, profile.n_part_objects, profile.n_parts)
    objects = tuple(ObjectClass(object_name(*combo), *combo, parts=schemes.get(k, ())) for k, combo in enumerate(combos))
    materials = materials_of(profile)
    scenes = tuple(scenes_of(profile, materials, rng))
    textures = tuple(textures_of(profile))
    labels: list[tuple[str, str]] = [(name, "color") for name in COLORS]
    first = {"color": 1, "object": len(labels) + 1}
    labels += [(obj.name, "object") for obj in objects]
    first["part"] = len(labels) + 1
    part_numbers = []
    for obj in objects:
        part_numbers.append(tuple(range(len(labels) + 1, len(labels) + 1 + len(obj.parts))))
        labels += [(f"{obj.name}-{part}", "part") for part in obj.parts]
    first["material"] = len(labels) + 1
    labels += [(m.name, "material") for m in materials]
    first["scene"] = len(labels) + 1
    labels += [(s.name, "scene") for s in scenes]
    first["texture"] = len(labels) + 1
    labels += [(t.name, "texture") for t in textures]
    names = [name for name, _ in labels]
    if len(set(names)) != len(names):
        raise AssertionError(f"the {profile.name} catalogue repeats label names")
    weights = {"object": cumulative_weights(len(objects), profile.zipf["object"]),
               "scene": cumulative_weights(len(scenes), profile.zipf["scene"]),
               "texture": cumulative_weights(len(textures), profile.zipf["texture"])}
    return Catalogue(profile, objects, tuple(materials), scenes, textures, tuple(labels), first,
                     tuple(part_numbers), weights)


def profile_by_name(name: str) -> Profile:
    """The profile called ``name``; a ValueError names the allowed ones."""
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; allowed are {', '.join(PROFILES)} (and basic for the "
                         f"original generator)")
    return PROFILES[name]


# ---------------------------------------------------------------------------------------------------------------
# Plans


@dataclass(frozen=True)
class ObjectPlan:
    """One object: class index, centre and radius (fractions of the image side), rotation jitter, colours."""

    cls: int
    cx: float
    cy: float
    radius: float
    rotation: float
    """Degrees added to the variant's rotation."""
    colors: tuple[str, ...]
    """One base colour per part (one for objects without parts), then the accent colour."""


@dataclass(frozen=True)
class ScenePlan:
    """A scene class with its layout variation, the tile crop offsets of its regions, and objects in drawing order."""

    cls: int
    offset: float
    phase: float
    crops: tuple[tuple[int, int], ...]
    """(y0, x0) in the material tile, per region."""
    objects: tuple[ObjectPlan, ...]


@dataclass(frozen=True)
class TexturePlan:
    """A texture class in two colours (base, accent) with its small random variation."""

    cls: int
    colors: tuple[str, str]
    period_scale: float
    angle: float
    """Degrees of jitter."""
    phase: tuple[float, float]


@dataclass(frozen=True)
class ImagePlan:
    """Everything needed to render image ``index`` of a profile; exactly one of ``scene`` and ``texture`` is set."""

    profile: str
    index: int
    size: int
    split: str
    noise_seed: int
    scene: ScenePlan | None
    texture: TexturePlan | None


def draw(rng: np.random.Generator, cumulative: np.ndarray) -> int:
    """A class index drawn with the given cumulative weights."""
    return int(np.searchsorted(cumulative, rng.random(), side="right").clip(0, len(cumulative) - 1))


def plan_image(profile: str, seed: int, i: int, size: int) -> ImagePlan:
    """The deterministic plan of image ``i`` of the ``profile`` set generated with ``seed`` at ``size`` pixels."""
    cat = catalogue(profile)
    rng = np.random.default_rng([seed, i])
    split = "val" if i % VAL_EVERY == VAL_EVERY - 1 else "train"
    noise_seed = int(rng.integers(2**31))
    colour_names = list(COLORS)
    if rng.random() < TEXTURE_SHARE:
        colors = rng.choice(len(colour_names), size=2, replace=False)
        texture = TexturePlan(
            cls=draw(rng, cat.weights["texture"]),
            colors=(colour_names[colors[0]], colour_names[colors[1]]),
            period_scale=float(rng.uniform(0.9, 1.1)),
            angle=float(rng.uniform(-5, 5)),
            phase=(float(rng.random()), float(rng.random())),
        )
        return ImagePlan(profile, i, size, split, noise_seed, scene=None, texture=texture)
    scene_cls = draw(rng, cat.weights["scene"])
    regions = LAYOUTS[cat.scenes[scene_cls].layout]
    tile = tile_side(size)
    crops = tuple((int(rng.integers(0, tile - size + 1)), int(rng.integers(0, tile - size + 1)))
                  for _ in range(regions))
    offset, phase = float(rng.uniform(-0.05, 0.05)), float(rng.uniform(0, 2 * np.pi))
    low, high = cat.profile.objects_per_image
    objects = []
    log_low, log_high = np.log(cat.profile.radius[0]), np.log(cat.profile.radius[1])
    for _ in range(int(rng.integers(low, high + 1))):
        cls = draw(rng, cat.weights["object"])
        n_colors = max(1, len(cat.objects[cls].parts)) + 1
        colors = tuple(colour_names[c] for c in rng.choice(len(colour_names), size=n_colors, replace=False))
        objects.append(ObjectPlan(cls, cx=float(rng.uniform(0.2, 0.8)), cy=float(rng.uniform(0.2, 0.8)),
                                  radius=float(np.exp(rng.uniform(log_low, log_high))),
                                  rotation=float(rng.uniform(-10, 10)), colors=colors))
    scene = ScenePlan(scene_cls, offset, phase, crops, tuple(objects))
    return ImagePlan(profile, i, size, split, noise_seed, scene=scene, texture=None)


# ---------------------------------------------------------------------------------------------------------------
# Rendering


def tile_side(size: int) -> int:
    """Side of a material tile for ``size`` px images: twice the image side."""
    return 2 * size


@functools.lru_cache(maxsize=4)
def pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x) in units of the image side, each (size, size) float32 (cached, read-only)."""
    centres = (np.arange(size, dtype=np.float32) + 0.5) / size
    y, x = np.meshgrid(centres, centres, indexing="ij")
    y.flags.writeable = False
    x.flags.writeable = False
    return y, x


@functools.lru_cache(maxsize=None)
def material_tile(profile: str, index: int, size: int) -> np.ndarray:
    """The periodic tile of material ``index`` (tile_side(size),) * 2 + (3,) uint8, computed once per process."""
    material = catalogue(profile).materials[index]
    side = tile_side(size)
    if material.grain in PHOTOS:
        photo = getattr(skimage.data, material.grain)()
        grey = np.asarray(Image.fromarray(photo).resize((side, side), Image.BILINEAR), dtype=np.float32)
        rgb = grey[:, :, None] * np.array(MATERIAL_TINTS[material.grain], np.float32)
        return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    noise = np.random.default_rng([CATALOGUE_SEED, index]).standard_normal((side, side))
    fy = np.fft.fftfreq(side)[:, None] * side / 2  # cycles per image side (the tile is two sides)
    fx = np.fft.fftfreq(side)[None, :] * side / 2
    radius = np.hypot(fy, fx)
    centre = GRAINS[material.grain]
    gain = np.exp(-0.5 * ((radius - centre) / (0.35 * centre)) ** 2)
    streak = ORIENTATIONS[material.orientation]
    if streak is not None:
        # streaks along direction a have their frequency vector at a + 90 degrees
        angle = np.arctan2(fy, fx) - np.deg2rad(streak + 90)
        angle = (angle + np.pi / 2) % np.pi - np.pi / 2
        gain = gain * np.exp(-0.5 * (angle / np.deg2rad(12)) ** 2)
    field = np.real(np.fft.ifft2(np.fft.fft2(noise) * gain))
    field = (field - field.mean()) / (field.std() + 1e-12)
    rgb = np.array(TINTS[material.tint], np.float64) * (1 + 0.3 * np.clip(field, -2.5, 2.5))[:, :, None]
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def layout_regions(layout: str, offset: float, phase: float, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Region index (size, size) int8 of a scene layout; ``offset`` shifts its boundaries, ``phase`` its waves."""
    wave = 0.015 * np.sin(2 * np.pi * x + phase)
    if layout in ("horizon-high", "horizon", "horizon-low"):
        level = {"horizon-high": 0.32, "horizon": 0.47, "horizon-low": 0.62}[layout]
        region = y >= level + offset + wave
    elif layout == "vertical":
        region = x >= 0.5 + offset + 0.015 * np.sin(2 * np.pi * y + phase)
    elif layout == "diagonal":
        region = y >= x + offset
    elif layout == "antidiagonal":
        region = y >= 1 - x + offset
    elif layout == "bands":
        return ((y >= 0.34 + offset + wave).astype(np.int8) + (y >= 0.67 + offset - wave)).astype(np.int8)
    elif layout == "columns":
        return ((x >= 0.34 + offset).astype(np.int8) + (x >= 0.67 + offset)).astype(np.int8)
    elif layout == "box":
        region = np.maximum(np.abs(x - 0.5), np.abs(y - 0.5)) < 0.3 + offset
    elif layout == "disc":
        region = np.hypot(x - 0.5, y - 0.5) < 0.33 + offset
    elif layout == "quadrants":
        region = (x >= 0.5 + offset) ^ (y >= 0.5 + offset)
    elif layout == "wave":
        region = y >= 0.5 + offset + 0.08 * np.sin(4 * np.pi * x + phase)
    elif layout == "tilted":
        region = y >= 0.5 + offset + 0.4 * (x - 0.5)
    elif layout == "corner":
        region = (x < 0.45 + offset) & (y >= 0.55 - offset)
    else:
        raise ValueError(f"unknown layout {layout!r}; allowed are {', '.join(LAYOUTS)}")
    return region.astype(np.int8)


def polygon(r: np.ndarray, theta: np.ndarray, n: int) -> np.ndarray:
    """Inside a regular n-gon of circumradius 1 with a vertex at the top."""
    sector = 2 * np.pi / n
    local = (theta + np.pi / 2) % sector - sector / 2
    return r * np.cos(local) <= np.cos(np.pi / n)


def star(r: np.ndarray, theta: np.ndarray, n: int, inner: float = 0.45) -> np.ndarray:
    """Inside an n-point star (outer radius 1, inner ``inner``) with a point at the top."""
    sector = 2 * np.pi / n
    t = np.abs(2 * (((theta + np.pi / 2) % sector) / sector) - 1)
    return r <= inner + (1 - inner) * t ** 2


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside ``shape`` at object coordinates (u right, v down, unit = radius); every shape lies in the unit disc."""
    r = np.hypot(u, v)
    theta = np.arctan2(v, u)
    au, av = np.abs(u), np.abs(v)
    if shape == "disc":
        return r <= 1
    if shape == "square":
        return np.maximum(au, av) <= 0.7
    if shape in ("triangle", "pentagon", "hexagon", "octagon"):
        return polygon(r, theta, {"triangle": 3, "pentagon": 5, "hexagon": 6, "octagon": 8}[shape])
    if shape in ("star4", "star5", "star6"):
        return star(r, theta, int(shape[-1]))
    if shape == "ring":
        return (r <= 1) & (r >= 0.55)
    if shape == "cross":
        return ((au <= 0.28) & (av <= 0.95)) | ((av <= 0.28) & (au <= 0.95))
    if shape == "crescent":
        return (r <= 1) & (np.hypot(u - 0.45, v) > 0.78)
    if shape == "squircle":
        return au ** 4 + av ** 4 <= 0.8 ** 4
    if shape == "diamond":
        return au + av <= 1
    if shape == "frame":
        return (np.maximum(au, av) <= 0.7) & (np.maximum(au, av) >= 0.4)
    if shape == "halfdisc":
        return (np.hypot(u, v + 0.4) <= 0.95) & (v >= -0.4)
    if shape == "trapezoid":
        return (av <= 0.6) & (au <= 0.4 + 0.4 * (v + 0.6) / 1.2)
    if shape == "tee":
        return ((au <= 0.68) & (v >= -0.68) & (v <= -0.3)) | ((au <= 0.2) & (av <= 0.68))
    if shape == "ell":
        return ((u >= -0.65) & (u <= -0.25) & (av <= 0.65)) | ((au <= 0.65) & (v >= 0.25) & (v <= 0.65))
    if shape == "lens":
        return (np.hypot(u - 0.55, v) <= 1.1) & (np.hypot(u + 0.55, v) <= 1.1) & (r <= 1)
    if shape == "flower":
        return r <= 0.68 + 0.32 * np.cos(5 * (theta + np.pi / 2))
    if shape == "hourglass":
        return (av <= 0.7) & (au <= 0.12 + 0.75 * av)
    raise ValueError(f"unknown shape {shape!r}; allowed are {', '.join(SHAPES)}")


def pattern_mask(pattern: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Where the accent colour of a fill pattern shows, at object coordinates (period ``PATTERN_PERIOD``)."""
    q = PATTERN_PERIOD
    if pattern == "solid":
        return np.zeros(u.shape, bool)
    if pattern.startswith("stripes"):
        angle = np.deg2rad(float(pattern[len("stripes"):]))
        w = -u * np.sin(angle) + v * np.cos(angle)
        return np.floor(2 * w / q) % 2 == 1
    if pattern == "dots":
        return ((u / q) % 1 - 0.5) ** 2 + ((v / q) % 1 - 0.5) ** 2 <= 0.32 ** 2
    if pattern == "checks":
        return (np.floor(u / q + 0.5) + np.floor(v / q + 0.5)) % 2 == 1
    if pattern == "rings":
        return np.floor(2 * np.hypot(u, v) / q) % 2 == 1
    if pattern == "grid":
        return ((u / q + 0.1) % 1 < 0.22) | ((v / q + 0.1) % 1 < 0.22)
    if pattern == "halves":
        return u > 0
    if pattern == "wedges":
        return np.floor(np.arctan2(v, u) / (np.pi / 4)) % 2 == 1
    raise ValueError(f"unknown pattern {pattern!r}; allowed are {', '.join(PATTERNS)}")


def part_index(parts: tuple[str, ...], shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Index into ``parts`` (int8, object coordinates) of every point of the object."""
    if parts == ("top", "bottom"):
        return (v >= 0).astype(np.int8)
    if parts == ("left", "right"):
        return (u >= 0).astype(np.int8)
    if parts == ("rim", "core"):
        return shape_mask(shape, u / 0.55, v / 0.55).astype(np.int8)
    if parts == ("cap", "body"):
        return (v >= -0.35).astype(np.int8)
    if parts == ("top", "band", "bottom"):
        return ((v >= -0.22).astype(np.int8) + (v >= 0.22)).astype(np.int8)
    if parts == ("left", "middle", "right"):
        return ((u >= -0.22).astype(np.int8) + (u >= 0.22)).astype(np.int8)
    raise ValueError(f"unknown part scheme {parts}; allowed are {PART_SCHEMES}")


def texture_accent(texture: TextureClass, plan: TexturePlan, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Boolean map (size, size): where a texture image shows its accent colour."""
    period = texture.period * plan.period_scale
    family = texture.family
    base_angle = {"striped-v": 90.0, "striped-d": 45.0, "striped-a": 135.0, "diamond": 45.0,
                  "crosshatched": 45.0}.get(family, 0.0)
    angle = np.deg2rad(base_angle + plan.angle)
    u = (x * np.cos(angle) + y * np.sin(angle)) / period + plan.phase[0]
    v = (-x * np.sin(angle) + y * np.cos(angle)) / period + plan.phase[1]
    if family.startswith("striped"):
        return np.floor(2 * v) % 2 == 1
    if family in ("chequered", "diamond"):
        return (np.floor(u) + np.floor(v)) % 2 == 1
    if family == "dotted":
        return (u % 1 - 0.5) ** 2 + (v % 1 - 0.5) ** 2 <= 0.3 ** 2
    if family == "polka":
        return ((u + 0.5 * np.floor(v)) % 1 - 0.5) ** 2 + (v % 1 - 0.5) ** 2 <= 0.22 ** 2
    if family == "grid":
        return (u % 1 < 0.2) | (v % 1 < 0.2)
    if family == "crosshatched":
        return (u % 1 < 0.12) | (v % 1 < 0.12)
    if family == "zigzagged":
        return np.floor(2 * (u + 0.5 * np.abs(2 * (v % 1) - 1))) % 2 == 1
    if family == "wavy":
        return np.floor(2 * (v + 0.25 * np.sin(2 * np.pi * u))) % 2 == 1
    if family in ("concentric", "spiral"):
        cy, cx = 0.3 + 0.4 * plan.phase[0], 0.3 + 0.4 * plan.phase[1]
        r = np.hypot(y - cy, x - cx) / period
        if family == "spiral":
            r = r + np.arctan2(y - cy, x - cx) / (2 * np.pi)
        return np.floor(2 * r) % 2 == 1
    if family == "brick":
        row = np.floor(2 * v)
        return ((2 * v) % 1 < 0.18) | ((u + 0.5 * row) % 1 < 0.09)
    if family == "triangles":
        return ((np.floor(u) + np.floor(v)) % 2 == 0) ^ ((u % 1) + (v % 1) > 1)
    if family == "plaid":
        return ((u % 1) < 0.35) ^ ((v % 1) < 0.35)
    raise ValueError(f"unknown texture family {family!r}; allowed are {', '.join(TEXTURE_FAMILIES)}")


def colour_values(names: tuple[str, ...]) -> np.ndarray:
    """RGB values (k, 3) float32 of colour names."""
    return np.array([COLORS[name] for name in names], np.float32)


def paint_object(cat: Catalogue, obj: ObjectPlan, size: int, rgb: np.ndarray, maps: dict[str, np.ndarray],
                 part_layers: list[np.ndarray]) -> None:
    """Draw one object into rgb (size, size, 3) and the full-resolution label maps, in place.

    Occludes the material and earlier part layers under it; appends its own part layer if it has parts.
    """
    cls = cat.objects[obj.cls]
    aspect, base_rotation = VARIANTS[cls.variant]
    radius_px = obj.radius * size
    top = max(0, int(np.floor((obj.cy - obj.radius) * size)))
    bottom = min(size, int(np.ceil((obj.cy + obj.radius) * size)) + 1)
    left = max(0, int(np.floor((obj.cx - obj.radius) * size)))
    right = min(size, int(np.ceil((obj.cx + obj.radius) * size)) + 1)
    if top >= bottom or left >= right:
        return
    py = ((np.arange(top, bottom, dtype=np.float32) + 0.5) - obj.cy * size) / radius_px
    px = ((np.arange(left, right, dtype=np.float32) + 0.5) - obj.cx * size) / radius_px
    dy, dx = py[:, None], px[None, :]
    angle = math.radians(base_rotation + obj.rotation)
    cos, sin = np.float32(math.cos(angle)), np.float32(math.sin(angle))
    u = (dx * cos + dy * sin) / np.float32(aspect)
    v = -dx * sin + dy * cos
    inside = shape_mask(cls.shape, u, v)
    if not inside.any():
        return
    window = (slice(top, bottom), slice(left, right))
    accent = pattern_mask(cls.pattern, u, v) & inside
    n_base = len(obj.colors) - 1
    base_index = part_index(cls.parts, cls.shape, u, v) if cls.parts else np.zeros(u.shape, np.int8)
    colour_index = np.where(accent, n_base, base_index)
    colour_numbers = np.array([cat.first_number["color"] + list(COLORS).index(c) for c in obj.colors], np.int32)
    rgb_window = rgb[window]
    rgb_window[inside] = colour_values(obj.colors)[colour_index[inside]]
    maps["color"][window][inside] = colour_numbers[colour_index[inside]]
    maps["object"][window][inside] = cat.first_number["object"] + obj.cls
    maps["material"][window][inside] = 0
    for layer in part_layers:
        layer[window][inside] = 0
    if cls.parts:
        layer = np.zeros((size, size), np.int32)
        layer[window][inside] = np.array(cat.part_numbers[obj.cls], np.int32)[base_index[inside]]
        part_layers.append(layer)


def render(plan: ImagePlan) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, list[int]]]:
    """Render a plan.

    Returns the image (size, size, 3) uint8, the masks per pixel category
    (layers, size // 2, size // 2) int32 (0 layers when the category has no
    labelled pixel) and the whole-image labels per image category.
    """
    cat = catalogue(plan.profile)
    size = plan.size
    y, x = pixel_grid(size)
    image_labels: dict[str, list[int]] = {category: [] for category in IMAGE_CATEGORIES}
    maps = {category: np.zeros((size, size), np.int32) for category in ("color", "object", "material")}
    part_layers: list[np.ndarray] = []
    if plan.texture is not None:
        texture = cat.textures[plan.texture.cls]
        accent = texture_accent(texture, plan.texture, y, x)
        colours = colour_values(plan.texture.colors)
        rgb = np.where(accent[:, :, None], colours[1], colours[0])
        base, second = (cat.first_number["color"] + list(COLORS).index(c) for c in plan.texture.colors)
        maps["color"] = np.where(accent, second, base).astype(np.int32)
        image_labels["texture"].append(cat.first_number["texture"] + plan.texture.cls)
    else:
        scene = cat.scenes[plan.scene.cls]
        regions = layout_regions(scene.layout, plan.scene.offset, plan.scene.phase, y, x)
        rgb = np.empty((size, size, 3), np.float32)
        material_numbers = np.array([cat.first_number["material"] + m for m in scene.materials], np.int32)
        for region, (material, (y0, x0)) in enumerate(zip(scene.materials, plan.scene.crops)):
            where = regions == region
            crop = material_tile(plan.profile, material, size)[y0:y0 + size, x0:x0 + size]
            rgb[where] = crop[where]
        maps["material"] = material_numbers[regions]
        for obj in plan.scene.objects:
            paint_object(cat, obj, size, rgb, maps, part_layers)
        image_labels["scene"].append(cat.first_number["scene"] + plan.scene.cls)
    noise = np.random.default_rng(plan.noise_seed).standard_normal((size, size, 3), dtype=np.float32)
    image = np.clip(np.rint(rgb + noise * np.float32(NOISE_SIGMA)), 0, 255).astype(np.uint8)
    full = {"color": [maps["color"]], "object": [maps["object"]], "part": part_layers, "material": [maps["material"]]}
    side = mask_size(size)
    masks = {}
    for category in PIXEL_CATEGORIES:
        layers = [layer for layer in (to_mask_resolution(m) for m in full[category]) if layer.any()]
        masks[category] = np.stack(layers) if layers else np.zeros((0, side, side), np.int32)
    return image, masks, image_labels


# ---------------------------------------------------------------------------------------------------------------
# Building


def build_image(i: int, images_dir: Path, profile: str, seed: int, size: int, n_images: int) -> ImageRecord:
    """Render image ``i``, write its JPEG and mask PNGs into ``images_dir`` and return its record."""
    plan = plan_image(profile, seed, i, size)
    image, masks, image_labels = render(plan)
    return write_image_files(images_dir, image_stem(i, n_images), plan.split, image, masks, image_labels,
                             jpeg_quality=JPEG_QUALITY, png_compress_level=PNG_COMPRESS_LEVEL)


def build_params(profile: str, n_images: int, size: int, seed: int) -> dict:
    """The parameters recorded in synthetic.json; a build is reused only when they match."""
    return {"version": FORMAT_VERSION, "profile": profile, "n_images": n_images, "size": size, "seed": seed}


def is_complete(root: Path, profile: str, n_images: int, size: int, seed: int) -> bool:
    """Whether ``root`` holds a finished build of ``profile`` with these parameters."""
    return params_match(root, build_params(profile, n_images, size, seed))


def check_arguments(profile: str, n_images: int | None, size: int, workers: int | None) -> None:
    """Raise ValueError (one line: what is wrong, what is allowed) for a bad profile, count, size or worker count."""
    if profile not in ALL_PROFILES:
        raise ValueError(f"unknown profile {profile!r}; allowed are {', '.join(ALL_PROFILES)}")
    if n_images is not None and n_images < 1:
        raise ValueError(f"n_images must be at least 1, got {n_images}")
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")


def generate(root: Path, profile: str = DEFAULT_PROFILE, n_images: int | None = None, size: int = 224,
             seed: int = 0, workers: int | None = None, chunk_size: int = 64) -> Path:
    """Build the ``profile`` set into ``root`` (which must not exist) and return ``root``.

    ``n_images`` defaults to the profile's size (``PROFILES[profile].n_images``), ``workers`` to the number
    of CPUs. Resumes a leftover ``<root>.partial`` of the same parameters (``data_prep.broden_build``).
    """
    check_arguments(profile, n_images, size, workers)
    cat = catalogue(profile)
    n_images = n_images or cat.profile.n_images
    workers = workers or os.cpu_count() or 1
    job = functools.partial(build_image, profile=profile, seed=seed, size=size, n_images=n_images)
    return build(Path(root), n_images, build_params(profile, n_images, size, seed), job, cat.labels, workers,
                 chunk_size)
