r"""ViDiT-Q (Zhao et al., ICLR 2025) as its public code quantizes PixArt: its settings, in one place.

ViDiT-Q's PixArt-Sigma configurations (``t2i/configs/quant/sigma/*.yaml`` and
``qdiff/models/quant_layer_pixart.py`` of thu-nics/ViDiT-Q) quantize every linear layer with

* **channel balancing**: SmoothQuant-style per-input-channel scales
  :math:`s_j = a_j^{\alpha} / \max_i |W_{ij}|^{1-\alpha}` with :math:`\alpha` = :data:`ALPHA` (0.3),
  the activation divided by s and the weight multiplied by it before it is quantized; :math:`a_j`
  is a static statistic from calibration (``momentum_act_max``: an exponential moving average,
  momentum 0.95, of the per-batch mean of each sample's per-channel maximum over tokens);
* **activations**: per token, *dynamic* (the range computed online for every call), asymmetric
  min-max, round to nearest;
* **weights**: per output channel, min-max, round to nearest.

Here the ``viditq`` method of the image experiments (:mod:`stamp_lib.experiments.diffusion`,
:mod:`stamp_lib.experiments.pixart`) is the library's SmoothQuant feature transform with
:data:`ALPHA` and the experiments' per-token dynamic activation quantizer. Departures
(:data:`DEPARTURES`, written into every record that uses it): the channel statistic is the maximum
over all calibration inputs (the library's SmoothQuant statistic), not the moving average of
per-batch means; weights are quantized symmetrically, per output channel or in the groups the
experiment sets for every row; the timestep-wise and mixed-precision parts of the paper (its
layer-wise bit search driven by image-quality metrics, W4A8/W6A6 in the published configs) and
the rotation of its static-dynamic balancing (not in the public PixArt configs) are not run.
STaMP on top changes only the activation quantizer of the image-token inputs.
"""

from __future__ import annotations

from . import FEATURE_OF, IMAGE_BASELINES

__all__ = ["NAME", "ALPHA", "FEATURE", "DEPARTURES", "IMAGE_METHODS", "IMAGE_FEATURE_OF"]

NAME = "viditq"
ALPHA = 0.3  # smooth_quant.alpha of ViDiT-Q's PixArt configs
SMOOTHQUANT_ALPHA = 0.5  # SmoothQuant's (and SVDQuant's smoothing) default migration strength


def alpha_for(method: str, alpha: float | None = None) -> float:
    """The smoothing strength of an image baseline: ``alpha`` if given, else :data:`ALPHA` for
    ViDiT-Q and :data:`SMOOTHQUANT_ALPHA` for the SmoothQuant-smoothed others."""
    return (ALPHA if method == NAME else SMOOTHQUANT_ALPHA) if alpha is None else alpha
FEATURE = "smoothquant"
DEPARTURES = (
    "channel statistic: max over the calibration inputs (ViDiT-Q: moving average, momentum 0.95, of per-batch "
    "means of per-sample channel maxima)",
    "weights symmetric, with the granularity every row of the experiment uses",
    "no timestep-wise scales, no mixed-precision layer search, no rotation",
)
# the image experiments' methods: the shared baselines plus ViDiT-Q (its feature transform: SmoothQuant's scales)
IMAGE_METHODS = IMAGE_BASELINES + (NAME,)
IMAGE_FEATURE_OF = {**FEATURE_OF, NAME: FEATURE}
