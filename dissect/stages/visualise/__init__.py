"""The visualise stage: what a unit wants to see.

For the selected units and classes it synthesises, by gradient ascent on the
input with the weights frozen, the image that maximises each one's objective
(``objectives``), in one of two parameterisations (``images``: a Fourier-basis
image in decorrelated colour with random transforms, Olah et al. 2017, or
regularised pixels, Yosinski et al. 2015), many targets per batch
(``ascent``); it dreams on real images, octave by octave (``dream``); and it
draws every unit's stored map of a layer on chosen probe images (``viewer``).
``stage`` chooses the targets, runs the model work as dask tasks and writes
the outputs.

Outputs in ``<out_dir>/visualise/`` (``dissect.layout.RunLayout``):

- ``units.csv``: one row per synthesised image: kind (unit|class), layer
  (empty for classes), index (unit or class), copy (0..copies-1), seed,
  reason (detector, label, pair, dead, nearly dead, class), objective (mean,
  centre, logit), param, steps, initial and reached (the objective on the
  image before and after, without transforms, at the input size),
  best_probe and best_probe_image (the same objective's largest value over
  the probe images, from the stored activations, and that image's index;
  empty for classes), exceeds_probe, flat (the objective's gradient was zero at
  every step: nothing in the input drives it), max_gradient (the largest
  |gradient| seen), image_std (its pixels' standard deviation, in [0, 1]), image (its PNG, relative to the run
  directory: ``layers/<layer>/unit_<u:05d>_<copy>.png`` or
  ``classes/class_<c:05d>_<copy>.png``);
- ``dream.csv`` and ``dream/dream_<n:03d>_<layer>.png`` (the image, then its
  dream): one row per image and octave with its size and the layer objective
  at the octave's start and end;
- ``viewer.csv`` and ``viewer/image_<index:06d>/<layer>_maps.png`` (every
  unit's map as a grayscale tile; the tile geometry and each tile's scale are
  in the row) and ``<layer>_overlay.png`` (the image and its strongest units'
  maps over it);
- ``visualise.json``: settings, workers, seconds (per image, batched), flat
  images, how many reached objectives exceed the best probe image's, deep
  dream and viewer summaries;
- the stage's stamp, written last (inputs: the settings, the model, the probe
  set, the layers, the extract, audit and tally stamps).
"""

from dissect.stages.visualise.stage import FORMAT, UNIT_COLUMNS, check, run

__all__ = ["FORMAT", "UNIT_COLUMNS", "check", "run"]
