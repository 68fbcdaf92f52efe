"""The explanations stage: compare and score the attribute stage's class maps.

What it explains: the attribute stage's class pairs (``attribute/pairs.csv``,
kind class: an image and the class explained on it, by default the predicted
one); the maps are those of ``attribute/maps.zarr`` (every method of the
method table that ran), plus the explainers run here:

- the four deterministic occlusion explainers of ``occlusion`` (grid,
  statistical, two-level, elbow), each run twice (the second run is the
  control of determinism) and once on a Gaussian-blurred copy of the image
  (``blur_sigma``);
- LIME (the attribute stage's Captum LIME, segments and samples) with each of
  the two ``lime_seeds``, and with the first on the blurred copy.

Binary masks (``masks``): an attribute map keeps its top ``mask_share`` of
pixels by value; LIME (the attribute stage's and the stage's runs) keeps its
``lime_superpixels`` top superpixels; the occlusion explainers give theirs.

Comparisons, each a table with one row per image and compared pair of masks
(``jaccard_<kind>.csv``; columns pair, image_index, image_id, target, a, b,
jaccard, a_pixels, b_pixels, and more for blur and models):

- ``methods``: every two masks of the same image;
- ``seeds``: LIME's two seeds, and each deterministic explainer against its
  second run (the control: Jaccard 1);
- ``blur``: each explainer's mask on the image against its mask on the blurred
  copy, explaining the same class, with the predicted class and the class
  probability before and after (blur_sigma, predicted_sharp,
  predicted_blurred, probability_sharp, probability_blurred);
- ``models``: with ``compare_run`` (another run directory, another model on
  the same probe images, whose explanations stage finished): each method's
  mask against the same method's mask of the other model on the same image
  (matched by image id; each model explains its own class, other_target; the
  other mask is resized by nearest neighbour when the input sizes differ).

Faithfulness (``faithfulness``): deletion and insertion curves of every map
(attribute maps, explainers' heat maps, LIME's coefficients) and of a seeded
random map of the same image, ``steps`` steps each, with their areas.

Outputs in ``<out_dir>/explanations/``:

- ``pairs.csv``: the explained class pairs (the attribute stage's rows);
- ``masks.zarr``: per mask name an array (pairs, S, S) bool, ``heat/<name>``
  (pairs, S, S) float32 for the stage's explainers, ``blurred/<name>`` their
  masks on the blurred copies;
- ``explainers.csv``: pair, image_index, image_id, target, explainer, run
  (sharp, control, blurred), model_calls, seconds, cells_kept, mask_pixels;
- ``jaccard_<kind>.csv`` as above;
- ``overlays/<kind>/<a>__<b>/image_<index:06d>.png``: the ``overlays``
  lowest and highest images of each compared pair (for ``methods`` only the
  explainers against LIME), A red, B green, both yellow;
- ``faithfulness.csv``: pair, image_index, image_id, target, method,
  deletion_auc, insertion_auc (method ``random``: the random map);
  ``curves.csv``: pair, method, curve (deletion|insertion), step, fraction,
  probability; ``curves.png``: the mean curves;
- ``explanations.json``: settings, per explainer seconds and model calls per
  image and LIME's seconds over its own, per comparison the mean Jaccard and
  its five lowest and highest images, the control's verdict, the blur's
  changed predictions, mean AUCs per method against the random map's, the
  overlay index;
- the stage's stamp, written last (inputs: the settings, the attribute stage's
  stamp, the other run's explanations stamp, the model, the probe set).
"""

from dissect.stages.explanations.faithfulness import auc, curve_images, deletion_insertion, pixel_order
from dissect.stages.explanations.masks import jaccard, overlay, resize_mask, top_segments_mask, top_share_mask
from dissect.stages.explanations.occlusion import (
    EXPLAINER_FUNCTIONS,
    EXPLAINERS,
    Explanation,
    Scorer,
    grid_boxes,
    keep_count,
    knee,
    occlusion_drops,
    ranking,
    split_boxes,
)
from dissect.stages.explanations.stage import (
    COMPARISONS,
    FORMAT,
    ExplanationError,
    blur,
    check,
    class_pairs,
    comparison_tables,
    explain_pair,
    lime_explanation,
    lime_name,
    random_map,
    run,
    summarise,
)

__all__ = [
    "COMPARISONS",
    "EXPLAINERS",
    "EXPLAINER_FUNCTIONS",
    "FORMAT",
    "ExplanationError",
    "Explanation",
    "Scorer",
    "auc",
    "blur",
    "check",
    "class_pairs",
    "comparison_tables",
    "curve_images",
    "deletion_insertion",
    "explain_pair",
    "grid_boxes",
    "jaccard",
    "keep_count",
    "knee",
    "lime_explanation",
    "lime_name",
    "occlusion_drops",
    "overlay",
    "pixel_order",
    "random_map",
    "ranking",
    "resize_mask",
    "run",
    "split_boxes",
    "summarise",
    "top_segments_mask",
    "top_share_mask",
]
