"""Per-image explanations: one algorithm per module, one call shape
``Method(model, layer_or_None, **options).attribute(inputs, target) -> (N, H, W)`` (Captum's style), enforced by
the base class `attribution.Attribution`; `METHODS` is the registry the explainer, the CLI and job files use.

    saliency.Saliency        Simonyan et al. 2013                   input gradients of the logit
    attribution.SmoothGrad   Smilkov et al. 2017                    a wrapper around any method (noisy copies)
    occlusion.Occlusion      Zeiler & Fergus 2013                   target probability under a sliding square
    cam.CAM                  Zhou et al. 2016                       GAP + linear networks only (checked)
    gradcam.GradCAM          Selvaraju et al. 2017                  any layer
    deepdream.DeepDream      Mordvintsev et al. 2015                amplify a layer (returns images)
    localize                 threshold a saliency map into a box, IoU
    causal.CausalMetric      Petsiuk et al. 2018                    deletion / insertion curves and AUC
    randomization            Adebayo et al. 2018                    cascading model-randomization check

The file-writing side (`explainer`, `outputs`, `images`, `data_runner`) and the benchmark (`bench`) build on
these. Importing this package imports torch but starts nothing.
"""

from pipeline.explain.attribution import Attribution, SmoothGrad
from pipeline.explain.cam import CAM, CAMError, find_gap_linear_head
from pipeline.explain.causal import CausalMetric
from pipeline.explain.deepdream import DeepDream
from pipeline.explain.gradcam import GradCAM
from pipeline.explain.occlusion import Occlusion, OcclusionResult
from pipeline.explain.saliency import Saliency

# The map methods by the name `--methods` and job files use, in the order they are computed and shown.
METHODS: dict[str, type[Attribution]] = {"saliency": Saliency, "occlusion": Occlusion, "cam": CAM, "gradcam": GradCAM}

__all__ = [
    "METHODS",
    "Attribution",
    "SmoothGrad",
    "CAM",
    "CAMError",
    "CausalMetric",
    "DeepDream",
    "GradCAM",
    "Occlusion",
    "OcclusionResult",
    "Saliency",
    "find_gap_linear_head",
]
