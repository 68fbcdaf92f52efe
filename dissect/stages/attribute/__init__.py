"""The attribute stage: attribution maps of selected units and output classes, with two trust checks.

What is explained. A *unit* u of layer L is explained on its top-k probe images
(``<layer>/topk.csv``) with the target "u's maximum activation over its map":
``UnitMaxima`` runs the model up to L (a forward hook stops the forward pass
there) and returns the (N, U) spatial maxima, so every Captum method sees an
ordinary output index. An output *class* is explained on chosen images, the
target being the model's predicted class or a class index from the config.
Many (target, image) pairs go through one Captum call (inputs (B, 3, S, S),
targets (B,)), in chunks of ``attribute.batch_size`` pairs; LIME alone is
called per image (Captum fits one linear model per image in any case), with
the same seed, so that its maps do not depend on the batch.

Where it runs. The model work (each method on each pair batch, each step
and method of the randomisation check) runs as dask tasks on the run's
cluster (``dissect.cluster``; by default one in-process worker), each worker
with its own copy of the model on its own device, loaded once per worker;
this process builds the pairs and writes every output. The maps and tables
do not depend on which worker ran what (every random draw is seeded per
piece); ``stage`` and ``worker`` say how.

Methods (all from Captum; this module is glue) and the map each one stores,
(S, S) per pair:

=====================  ====================================================  ========
method                 Captum                                                map
=====================  ====================================================  ========
saliency               Saliency (abs=True)                                   sum_c |grad|
input_x_gradient       InputXGradient                                        sum_c, signed
deconvolution          Saliency under GuidedReLUs("deconvolution")           sum_c |.|
guided_backprop        Saliency under GuidedReLUs("guided_backprop")         sum_c |.|
grad_cam               LayerGradCam (ReLU'd), LayerAttribution.interpolate   >= 0
guided_grad_cam        guided_backprop x grad_cam (bilinear), as Captum's    sum_c |.|
integrated_gradients   IntegratedGradients (Gauss-Legendre, black baseline)  sum_c, signed
lrp                    zennit EpsilonPlusFlat (flat, z+, epsilon rules)      sum_c, signed
deeplift               Rescale rule on ReLU and max-pool calls (own, as      sum_c, signed
                       Captum's DeepLift rules), black reference
deeplift_shap          deeplift averaged over black + noise references       sum_c, signed
occlusion              Occlusion (window x window, black baseline)           signed
lime                   Lime per image on SLIC superpixels, linear fit        signed
=====================  ====================================================  ========

"Black baseline" is the normalised image of zero pixels. Occlusion and LIME
features span the three channels, so their map is the (shared) per-pixel value.
Grad-CAM runs at ``attribute.grad_cam_layer``: by default the unit's own layer
for units and the last Conv2d for classes.

Guided methods (deconvolution, guided_backprop, guided_grad_cam) replace the
backward pass of every ReLU. Captum does that with hooks on ``nn.ReLU``
modules, which miss ``F.relu`` (GoogLeNet, DenseNet) and mix the calls of a
reused module (ResNet blocks), so the rules are applied here to the ReLU
*functions* instead, call by call (``dissect.guided_relu``). DeepLIFT and
DeepLIFT-SHAP are Captum's rules applied the same way, call by call, to the
ReLU and max-pool functions of a doubled batch (input, reference), and LRP is
zennit's (not Captum's LRP, which fails on ``F.relu``, functional additions and
reused modules); ``relevance`` says why and how. ``prepare_model`` works on a
copy of the model with every ``inplace=True`` turned off. A model with other
activations (GELU, SiLU, ...) loses the ReLU-only methods (guided, LRP,
DeepLIFT) with one warning under ``methods: all``.

Outputs in ``<out_dir>/attribute/``:

- ``pairs.csv``: pair, kind (unit|class), layer (empty for classes), target
  (unit or class index), image_index, image_id, rank (top-k rank for units,
  order of the chosen images for classes), grad_cam_layer, score (the unit's
  maximum or the class logit on the image).
- ``maps.zarr``: per method an array ``<method>`` (pairs, S, S) float16 holding
  each map divided by its largest absolute value, and ``scale/<method>``
  (pairs,) float32 with that value (0 for an all-zero map); the raw map is
  ``maps[method][p] * scale[method][p]``. Float16 keeps 3 significant digits
  relative to each map's peak, whatever the method's units.
- ``strips/<layer>/unit_<u:05d>.png`` (rows: the unit's images; columns: the
  image, then each method's map over it) and
  ``strips/classes/image_<index:06d>_class_<c>.png`` (one row per class pair).
- ``agreement.csv`` (Broden probe sets): for each selected unit labelled with
  concept c (``layers/<layer>/tally.csv``), per method, the share of the map's
  *positive* mass inside c's mask on the unit's top images (mean over images
  with positive mass) against the chance share (the mask's area share on the
  same images).
- ``randomisation.csv``: the parameter-randomisation check of Adebayo et al.
  (2018). Parameterised modules are re-initialised (``reset_parameters``,
  seeded) cascading from the last one called in the forward pass down to the
  first; after each of ``randomisation_steps`` stages of the cascade the maps
  of up to ``randomisation_pairs`` pairs are recomputed and compared with the
  trained model's by the Spearman rank correlation of their absolute values
  (mean and standard deviation over the pairs whose trained map is not
  constant; a randomised map that became constant counts 0).
- ``attribute.json``: settings, conventions, timings (model seconds per
  method, summed over the workers), the device(s) and the workers (address:
  device, tasks run), agreement per method, final randomisation correlations
  and the methods flagged because their maps barely change once every layer
  is randomised (correlation above ``max_correlation``).
- the stage's stamp, written last (inputs: the settings, the model, the probe
  set, the layers, ``tally.iou_threshold`` and the tally and topk stamps of
  every layer), so a new tally or new top-k images re-run the stage.
"""

from dissect.stages.attribute.checks import (
    RANDOMISATION_COLUMNS,
    agreement_table,
    cascade_modules,
    cascade_stops,
    concept_mask,
    correlation_row,
    positive_share_inside,
    randomisation_cascade,
    randomisation_check,
    randomised_maps,
    randomised_model,
    spearman_abs,
)
from dissect.stages.attribute.errors import AttributionError
from dissect.stages.attribute.methods import (
    ABSOLUTE_METHODS,
    CAPTUM_NOISE,
    GUIDED_METHODS,
    MAP_CONVENTIONS,
    METHOD_TABLE,
    METHODS,
    RELU_ONLY_METHODS,
    Batch,
    Method,
    MethodSettings,
    PairBatch,
    attribution_maps,
    black_baseline,
    compute_maps,
    grad_cam,
    guided_gradient,
    lime,
    lime_maps,
    model_passes,
    occlusion,
    occlusion_passes,
    pair_batches,
    read_maps,
    stored_form,
    superpixels,
)
from dissect.stages.attribute.model import (
    Explained,
    PreparedModel,
    UnitMaxima,
    call_counts,
    check_grad_cam_layers,
    explained,
    forward_order,
    last_conv,
    prepare_model,
)
from dissect.stages.attribute.relevance import (
    DeepLiftRules,
    OutOfPlaceReLUs,
    batch_norm_follows_linear,
    deeplift,
    deeplift_shap,
    lrp,
    shap_references,
)
from dissect.stages.attribute.pairs import (
    build_pairs,
    class_image_indices,
    load_images,
    predicted_classes,
    scores,
    select_units,
    unit_pair_rows,
)
from dissect.stages.attribute.settings import (
    DEVICE_DEFAULT_KEYS,
    DEVICE_DEFAULTS,
    SETTING_KEYS,
    UNIT_SELECTIONS,
    AttributeSettings,
    read_settings,
)
from dissect.stages.attribute.stage import (
    FORMAT,
    check,
    compute_on_cluster,
    cost_sentence,
    create_method,
    drop_relu_only_methods,
    mark_complete,
    model_spec,
    open_maps,
    prepare_workers,
    randomisation_pairs,
    run,
    stage_inputs,
    summary,
)
from dissect.stages.attribute.strips import (
    GAP,
    HEADER,
    TILE,
    heat_overlay,
    strip_image,
    write_strips,
)
from dissect.stages.attribute.worker import (
    ModelSpec,
    Piece,
    load_seeded,
    maps_task,
    randomised_task,
    share_model,
    worker_device,
    worker_model,
)

__all__ = [
    "ABSOLUTE_METHODS",
    "CAPTUM_NOISE",
    "DEVICE_DEFAULTS",
    "DEVICE_DEFAULT_KEYS",
    "FORMAT",
    "GAP",
    "GUIDED_METHODS",
    "HEADER",
    "MAP_CONVENTIONS",
    "METHODS",
    "METHOD_TABLE",
    "RANDOMISATION_COLUMNS",
    "RELU_ONLY_METHODS",
    "SETTING_KEYS",
    "TILE",
    "UNIT_SELECTIONS",
    "AttributeSettings",
    "AttributionError",
    "Batch",
    "DeepLiftRules",
    "Explained",
    "Method",
    "MethodSettings",
    "ModelSpec",
    "OutOfPlaceReLUs",
    "PairBatch",
    "Piece",
    "PreparedModel",
    "UnitMaxima",
    "agreement_table",
    "attribution_maps",
    "batch_norm_follows_linear",
    "black_baseline",
    "build_pairs",
    "call_counts",
    "cascade_modules",
    "cascade_stops",
    "check",
    "check_grad_cam_layers",
    "class_image_indices",
    "compute_maps",
    "compute_on_cluster",
    "concept_mask",
    "correlation_row",
    "cost_sentence",
    "create_method",
    "deeplift",
    "deeplift_shap",
    "drop_relu_only_methods",
    "explained",
    "forward_order",
    "grad_cam",
    "guided_gradient",
    "heat_overlay",
    "last_conv",
    "lime",
    "lime_maps",
    "load_images",
    "load_seeded",
    "lrp",
    "maps_task",
    "mark_complete",
    "model_passes",
    "model_spec",
    "occlusion",
    "occlusion_passes",
    "open_maps",
    "pair_batches",
    "positive_share_inside",
    "predicted_classes",
    "prepare_model",
    "prepare_workers",
    "randomisation_cascade",
    "randomisation_check",
    "randomisation_pairs",
    "randomised_maps",
    "randomised_model",
    "randomised_task",
    "read_maps",
    "read_settings",
    "run",
    "scores",
    "select_units",
    "shap_references",
    "share_model",
    "spearman_abs",
    "stage_inputs",
    "stored_form",
    "strip_image",
    "summary",
    "superpixels",
    "unit_pair_rows",
    "worker_device",
    "worker_model",
    "write_strips",
]
