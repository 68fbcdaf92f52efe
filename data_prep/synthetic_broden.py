"""Generate a Broden-format data set with planted ground truth.

Every image is drawn from a plan (``plan_image(seed, i, size)``) that depends
only on the seed and the image number, so any image and its masks can be
regenerated exactly (``render(plan)``), and parallel builds are deterministic.

Content (all labels are planted; nothing is estimated):

- ~80% *scene* images. The background is a top and a bottom region split by a
  gently waving horizon; the pair of regions decides the scene label
  (``SCENES``: meadow = sky over grass, quarry = sky over gravel, plaza = sky
  over brick, courtyard = brick over gravel, garden = brick over grass,
  park = grass over gravel). Material regions are random crops/rescales of the
  real texture photos shipped with scikit-image (``skimage.data.brick``,
  ``grass``, ``gravel``), mildly tinted, and carry a material mask; ``sky`` is
  an object (a blue vertical gradient) and its pixels are coloured ``blue-c``.
  On top, 1-2 objects (``OBJECT_PARTS``) at random position and scale, later
  ones occluding earlier ones: ball (disc), box (square), pyramid (triangle),
  house (wall + roof + door), tree (trunk + crown), car (body + 2 wheels).
  Each part (or each whole object without parts) is painted in one of the 11
  Broden colours (``COLORS``, distinct colours within an object) plus pixel
  noise. Masks: object (visible object pixels and sky), part (one layer per
  visible object with parts, holding its visible parts; no layer otherwise),
  material (visible material pixels), color (painted pixels by their colour
  and sky as ``blue-c``; material pixels have no colour label).
- ~20% *texture* images: the whole image is one of the procedural patterns
  ``TEXTURES`` (striped, dotted, chequered, zigzagged, grid) in two distinct
  colours plus pixel noise; masks: color only (each pixel by its colour).

So every image has exactly one whole-image label: its scene or its texture.

Masks are label maps rendered at full resolution and sampled by nearest
neighbour at the mask resolution ``size // 2`` (mask pixel j takes image pixel
``floor((j + 0.5) * size / (size // 2))``), so they agree with the image.
A pixel category cell is empty exactly when the category has no labelled pixel.

Statistics follow the Broden conventions: ``frequency`` = number of images in
which a label appears; ``coverage`` = sum over those images of the share of
mask pixels carrying the label (1.0 per image for scene/texture), i.e. the
covered area in image units; category.csv ``frequency`` = sum of the label
frequencies of the category, ``first``/``last`` = smallest/largest label number.
Unlike Broden, which numbers labels by descending frequency, label numbers are
fixed (``LABELS``, grouped by category) so they do not depend on the seed or
the number of images; c_<category>.csv codes follow label-number order. Labels
that happen not to occur are still listed, with count 0.

Layout: ``images/<n>.jpg`` (JPEG quality 95, 4:4:4 chroma), ``images/<n>_<category>.png``
(``<n>_part_<k>.png`` for part layer k), the CSV files, and
``synthetic.json`` with the build parameters. The build goes into
``<root>.partial`` and is renamed to ``<root>`` when complete, so ``<root>``
exists only when complete; a leftover ``.partial`` directory with the same
parameters is resumed, one with others is rebuilt (``data_prep.broden_build``,
which also holds the image and table writers shared with ``data_prep.broden_like``
and the converters).

This is the ``basic`` profile of ``python -m data_prep synthetic``; the
``demo`` and ``broden-scale`` profiles are ``data_prep.broden_like``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

from data_prep import broden_build
from data_prep.broden_build import (  # noqa: F401  (re-exported: the converters and tests import them from here)
    JPEG_SUBSAMPLING,
    PARAMS_FILE,
    ImageRecord,
    build,
    image_stem,
    label_shares,
    params_match,
    write_csv,
    write_image_files,
    write_label_png,
)
from dissect.broden import IMAGE_CATEGORIES, PIXEL_CATEGORIES

COLORS: dict[str, tuple[int, int, int]] = {
    "black-c": (20, 20, 20),
    "blue-c": (30, 70, 210),
    "brown-c": (120, 70, 30),
    "green-c": (40, 160, 50),
    "grey-c": (128, 128, 128),
    "orange-c": (245, 140, 20),
    "pink-c": (250, 160, 200),
    "purple-c": (130, 50, 160),
    "red-c": (210, 30, 30),
    "white-c": (240, 240, 240),
    "yellow-c": (240, 220, 40),
}
OBJECT_PARTS: dict[str, tuple[str, ...]] = {
    "sky": (),
    "ball": (),
    "box": (),
    "pyramid": (),
    "house": ("wall", "roof", "door"),
    "tree": ("trunk", "crown"),
    "car": ("body", "wheel"),
}
PAINTED_OBJECTS = ("ball", "box", "pyramid", "house", "tree", "car")
PARTS = tuple(part for parts in OBJECT_PARTS.values() for part in parts)
MATERIAL_TINTS: dict[str, tuple[float, float, float]] = {
    "brick": (1.0, 0.78, 0.68),
    "grass": (0.78, 1.0, 0.72),
    "gravel": (0.97, 0.95, 0.9),
}
SCENES: dict[str, tuple[str, str]] = {
    "meadow": ("sky", "grass"),
    "quarry": ("sky", "gravel"),
    "plaza": ("sky", "brick"),
    "courtyard": ("brick", "gravel"),
    "garden": ("brick", "grass"),
    "park": ("grass", "gravel"),
}
TEXTURES = ("striped", "dotted", "chequered", "zigzagged", "grid")
LABELS: tuple[tuple[str, str], ...] = (
    tuple((name, "color") for name in COLORS)
    + tuple((name, "object") for name in OBJECT_PARTS)
    + tuple((name, "part") for name in PARTS)
    + tuple((name, "material") for name in MATERIAL_TINTS)
    + tuple((name, "scene") for name in SCENES)
    + tuple((name, "texture") for name in TEXTURES)
)
"""(name, category) of label number k + 1."""
LABEL_NUMBER: dict[str, int] = {name: k + 1 for k, (name, _) in enumerate(LABELS)}

TEXTURE_SHARE = 0.2
VAL_EVERY = 5
NOISE_SIGMA = 6.0
FORMAT_VERSION = 1


@dataclass(frozen=True)
class MaterialCrop:
    """A square crop of a 512 x 512 scikit-image texture photo, resized to fill the image."""

    name: str
    side: int
    x0: int
    y0: int


@dataclass(frozen=True)
class ObjectPlan:
    """One painted object; position and scale are fractions of the image size."""

    name: str
    cx: float
    cy: float
    scale: float
    colors: tuple[str, ...]
    """One colour per part in ``OBJECT_PARTS[name]`` order, or one colour for objects without parts."""


@dataclass(frozen=True)
class ScenePlan:
    """Background regions split at a waving horizon, plus painted objects (drawn in order)."""

    name: str
    horizon: float
    wave_amplitude: float
    wave_period: float
    wave_phase: float
    top: MaterialCrop | None
    """None when the top region is sky."""
    bottom: MaterialCrop
    objects: tuple[ObjectPlan, ...]


@dataclass(frozen=True)
class TexturePlan:
    """A two-colour procedural pattern; period is a fraction of the image size, angle in degrees."""

    name: str
    colors: tuple[str, str]
    period: float
    angle: int
    phase: float


@dataclass(frozen=True)
class ImagePlan:
    """Everything needed to render image ``index``; exactly one of ``scene`` and ``texture`` is set."""

    index: int
    size: int
    split: str
    noise_seed: int
    scene: ScenePlan | None
    texture: TexturePlan | None


def plan_image(seed: int, i: int, size: int) -> ImagePlan:
    """The deterministic plan of image ``i`` of the data set generated with ``seed`` at ``size`` pixels."""
    rng = np.random.default_rng([seed, i])
    split = "val" if i % VAL_EVERY == VAL_EVERY - 1 else "train"
    noise_seed = int(rng.integers(2**31))
    if rng.random() < TEXTURE_SHARE:
        colors = rng.choice(list(COLORS), size=2, replace=False)
        texture = TexturePlan(
            name=str(rng.choice(TEXTURES)),
            colors=(str(colors[0]), str(colors[1])),
            period=float(rng.uniform(1 / 10, 1 / 4)),
            angle=int(rng.choice([0, 45, 90, 135])),
            phase=float(rng.random()),
        )
        return ImagePlan(i, size, split, noise_seed, scene=None, texture=texture)
    name = str(rng.choice(list(SCENES)))
    top, bottom = SCENES[name]
    objects = []
    for _ in range(int(rng.integers(1, 3))):
        kind = str(rng.choice(PAINTED_OBJECTS))
        n_colors = max(1, len(OBJECT_PARTS[kind]))
        colors = tuple(str(c) for c in rng.choice(list(COLORS), size=n_colors, replace=False))
        objects.append(
            ObjectPlan(
                kind,
                cx=float(rng.uniform(0.25, 0.75)),
                cy=float(rng.uniform(0.3, 0.75)),
                scale=float(rng.uniform(0.25, 0.5)),
                colors=colors,
            )
        )
    scene = ScenePlan(
        name=name,
        horizon=float(rng.uniform(0.3, 0.65)),
        wave_amplitude=float(rng.uniform(0.0, 0.04)),
        wave_period=float(rng.uniform(0.5, 1.5)),
        wave_phase=float(rng.uniform(0, 2 * np.pi)),
        top=None if top == "sky" else plan_crop(rng, top),
        bottom=plan_crop(rng, bottom),
        objects=tuple(objects),
    )
    return ImagePlan(i, size, split, noise_seed, scene=scene, texture=None)


def plan_crop(rng: np.random.Generator, material: str) -> MaterialCrop:
    """A random square crop (side 128..512 px) of the 512 x 512 photo of ``material``."""
    side = int(rng.integers(128, 513))
    return MaterialCrop(material, side, int(rng.integers(0, 513 - side)), int(rng.integers(0, 513 - side)))


@functools.lru_cache(maxsize=None)
def material_photo(name: str) -> np.ndarray:
    """The scikit-image photo of material ``name``, shape (512, 512), uint8 grey values."""
    return getattr(skimage.data, name)()


def material_rgb(crop: MaterialCrop, size: int) -> np.ndarray:
    """The tinted crop resized to (size, size, 3), float32 in 0..255."""
    photo = material_photo(crop.name)[crop.y0 : crop.y0 + crop.side, crop.x0 : crop.x0 + crop.side]
    resized = np.asarray(Image.fromarray(photo).resize((size, size), Image.BILINEAR), dtype=np.float32)
    return resized[:, :, None] * np.array(MATERIAL_TINTS[crop.name], dtype=np.float32)


def pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x) in units of the image size, each of shape (size, size)."""
    centres = (np.arange(size, dtype=np.float32) + 0.5) / size
    return np.meshgrid(centres, centres, indexing="ij")


def disc(y: np.ndarray, x: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    """Boolean mask (size, size) of a disc."""
    return (y - cy) ** 2 + (x - cx) ** 2 <= r * r


def rect(y: np.ndarray, x: np.ndarray, top: float, bottom: float, left: float, right: float) -> np.ndarray:
    """Boolean mask (size, size) of an axis-aligned rectangle."""
    return (y >= top) & (y <= bottom) & (x >= left) & (x <= right)


def triangle(y: np.ndarray, x: np.ndarray, apex_y: float, base_y: float, cx: float, half_base: float) -> np.ndarray:
    """Boolean mask (size, size) of an upright isosceles triangle."""
    depth = (y - apex_y) / (base_y - apex_y)
    return (depth >= 0) & (depth <= 1) & (np.abs(x - cx) <= half_base * depth)


def object_shapes(obj: ObjectPlan, y: np.ndarray, x: np.ndarray) -> list[tuple[str | None, str, np.ndarray]]:
    """(part name or None, colour, boolean mask (size, size)) of an object, in drawing order."""
    cx, cy, s = obj.cx, obj.cy, obj.scale
    if obj.name == "ball":
        return [(None, obj.colors[0], disc(y, x, cy, cx, 0.5 * s))]
    if obj.name == "box":
        return [(None, obj.colors[0], rect(y, x, cy - 0.45 * s, cy + 0.45 * s, cx - 0.45 * s, cx + 0.45 * s))]
    if obj.name == "pyramid":
        return [(None, obj.colors[0], triangle(y, x, cy - 0.45 * s, cy + 0.45 * s, cx, 0.55 * s))]
    if obj.name == "house":
        wall, roof, door = obj.colors
        return [
            ("wall", wall, rect(y, x, cy - 0.05 * s, cy + 0.5 * s, cx - 0.4 * s, cx + 0.4 * s)),
            ("roof", roof, triangle(y, x, cy - 0.5 * s, cy - 0.05 * s, cx, 0.5 * s)),
            ("door", door, rect(y, x, cy + 0.2 * s, cy + 0.5 * s, cx - 0.1 * s, cx + 0.1 * s)),
        ]
    if obj.name == "tree":
        trunk, crown = obj.colors
        return [
            ("trunk", trunk, rect(y, x, cy, cy + 0.5 * s, cx - 0.08 * s, cx + 0.08 * s)),
            ("crown", crown, disc(y, x, cy - 0.15 * s, cx, 0.35 * s)),
        ]
    if obj.name == "car":
        body, wheel = obj.colors
        wheels = disc(y, x, cy + 0.2 * s, cx - 0.3 * s, 0.15 * s) | disc(y, x, cy + 0.2 * s, cx + 0.3 * s, 0.15 * s)
        return [
            ("body", body, rect(y, x, cy - 0.25 * s, cy + 0.15 * s, cx - 0.5 * s, cx + 0.5 * s)),
            ("wheel", wheel, wheels),
        ]
    raise ValueError(f"unknown object {obj.name!r}; allowed are {PAINTED_OBJECTS}")


def texture_pattern(plan: TexturePlan, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Boolean map (size, size): True where the pattern shows its second colour."""
    angle = np.deg2rad(plan.angle)
    u = (x * np.cos(angle) + y * np.sin(angle)) / plan.period + plan.phase
    v = (-x * np.sin(angle) + y * np.cos(angle)) / plan.period + plan.phase
    if plan.name == "striped":
        return np.floor(2 * u) % 2 == 1
    if plan.name == "dotted":
        return (u % 1 - 0.5) ** 2 + (v % 1 - 0.5) ** 2 <= 0.3**2
    if plan.name == "chequered":
        return (np.floor(2 * u) + np.floor(2 * v)) % 2 == 1
    if plan.name == "zigzagged":
        return np.floor(2 * (u + 0.5 * np.abs(2 * (v % 1) - 1))) % 2 == 1
    if plan.name == "grid":
        return (u % 1 < 0.2) | (v % 1 < 0.2)
    raise ValueError(f"unknown texture {plan.name!r}; allowed are {TEXTURES}")


def mask_size(size: int) -> int:
    """Side of the masks of a ``size`` x ``size`` image (Broden: half resolution)."""
    return size // 2


def to_mask_resolution(label_map: np.ndarray) -> np.ndarray:
    """Nearest-neighbour sample a (..., size, size) label map at (..., size // 2, size // 2)."""
    size = label_map.shape[-1]
    side = mask_size(size)
    rows = np.floor((np.arange(side) + 0.5) * size / side).astype(np.int64)
    return label_map[..., rows, :][..., :, rows]


def render(plan: ImagePlan) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, list[int]]]:
    """Render a plan.

    Returns the image (size, size, 3) uint8, the masks per pixel category
    (layers, size // 2, size // 2) int32 (0 layers when the category has no
    labelled pixel) and the whole-image labels per image category.
    """
    size = plan.size
    y, x = pixel_grid(size)
    full: dict[str, list[np.ndarray]] = {category: [] for category in PIXEL_CATEGORIES}
    image_labels: dict[str, list[int]] = {category: [] for category in IMAGE_CATEGORIES}
    if plan.texture is not None:
        second = texture_pattern(plan.texture, y, x)
        first_color, second_color = plan.texture.colors
        rgb = np.where(second[:, :, None], np.float32(COLORS[second_color]), np.float32(COLORS[first_color]))
        full["color"].append(np.where(second, LABEL_NUMBER[second_color], LABEL_NUMBER[first_color]))
        image_labels["texture"].append(LABEL_NUMBER[plan.texture.name])
    else:
        rgb, full = render_scene(plan.scene, y, x)
        image_labels["scene"].append(LABEL_NUMBER[plan.scene.name])
    noise = np.random.default_rng(plan.noise_seed).standard_normal((size, size, 3), dtype=np.float32) * NOISE_SIGMA
    image = np.clip(np.rint(rgb + noise), 0, 255).astype(np.uint8)
    masks = {}
    for category in PIXEL_CATEGORIES:
        sampled = [to_mask_resolution(layer) for layer in full[category]]
        layers = [layer.astype(np.int32) for layer in sampled if layer.any()]
        side = mask_size(size)
        masks[category] = np.stack(layers) if layers else np.zeros((0, side, side), np.int32)
    return image, masks, image_labels


def render_scene(scene: ScenePlan, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, dict[str, list[np.ndarray]]]:
    """RGB (size, size, 3) float32 and full-resolution label maps (size, size) per pixel category of a scene."""
    size = y.shape[0]
    boundary = scene.horizon + scene.wave_amplitude * np.sin(2 * np.pi * x / scene.wave_period + scene.wave_phase)
    is_top = y < boundary
    color = np.zeros((size, size), np.int32)
    obj = np.zeros((size, size), np.int32)
    material = np.zeros((size, size), np.int32)
    if scene.top is None:
        horizon_blue = np.array([170, 205, 245], np.float32)
        zenith_blue = np.array([70, 130, 220], np.float32)
        depth = np.clip(y / scene.horizon, 0, 1)[:, :, None]
        top_rgb = zenith_blue + depth * (horizon_blue - zenith_blue)
        obj[is_top] = LABEL_NUMBER["sky"]
        color[is_top] = LABEL_NUMBER["blue-c"]
    else:
        top_rgb = material_rgb(scene.top, size)
        material[is_top] = LABEL_NUMBER[scene.top.name]
    material[~is_top] = LABEL_NUMBER[scene.bottom.name]
    rgb = np.where(is_top[:, :, None], top_rgb, material_rgb(scene.bottom, size)).astype(np.float32)
    part_layers: list[np.ndarray] = []
    for plan in scene.objects:
        shapes = object_shapes(plan, y, x)
        covered = np.logical_or.reduce([mask for _, _, mask in shapes])
        obj[covered] = LABEL_NUMBER[plan.name]
        material[covered] = 0
        for layer in part_layers:
            layer[covered] = 0
        parts = np.zeros((size, size), np.int32)
        for part, colour, mask in shapes:
            rgb[mask] = COLORS[colour]
            color[mask] = LABEL_NUMBER[colour]
            if part is not None:
                parts[mask] = LABEL_NUMBER[part]
        if OBJECT_PARTS[plan.name]:
            part_layers.append(parts)
    return rgb, {"color": [color], "object": [obj], "part": part_layers, "material": [material]}


def build_image(i: int, images_dir: Path, seed: int, size: int, n_images: int) -> ImageRecord:
    """Render image ``i``, write its JPEG and mask PNGs into ``images_dir`` and return its record."""
    plan = plan_image(seed, i, size)
    image, masks, image_labels = render(plan)
    return write_image_files(images_dir, image_stem(i, n_images), plan.split, image, masks, image_labels)


def write_tables(root: Path, records: list[ImageRecord],
                 labels: tuple[tuple[str, str], ...] | list[tuple[str, str]] = LABELS) -> None:
    """``data_prep.broden_build.write_tables`` with this generator's ``LABELS`` as the default labels."""
    broden_build.write_tables(root, records, labels)


def build_params(n_images: int, size: int, seed: int) -> dict[str, int]:
    """The parameters recorded in synthetic.json; a build is reused only when they match."""
    return {"version": FORMAT_VERSION, "n_images": n_images, "size": size, "seed": seed}


def is_complete(root: Path, n_images: int, size: int, seed: int) -> bool:
    """Whether ``root`` holds a finished build with these parameters."""
    return params_match(root, build_params(n_images, size, seed))


def generate(root: Path, n_images: int = 3000, size: int = 224, seed: int = 0, workers: int = 2) -> Path:
    """Build the synthetic Broden data set into ``root`` (which must not exist yet) and return ``root``.

    The build goes into ``<root>.partial`` and is renamed to ``root`` at the end; a leftover
    ``.partial`` of the same parameters is resumed (``data_prep.broden_build.build``).
    """
    root = Path(root)
    if n_images < 1 or size < 16 or workers < 1:
        raise ValueError(f"need n_images >= 1, size >= 16 and workers >= 1; got {n_images}, {size}, {workers}")
    job = functools.partial(build_image, seed=seed, size=size, n_images=n_images)
    return build(root, n_images, build_params(n_images, size, seed), job, LABELS, workers)
