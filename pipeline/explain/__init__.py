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
these. Importing this package imports nothing heavy: each name is loaded on first use (with torch).
"""

import importlib

# Each public name and the module that defines it. The package imports none of them until one is used (PEP 562),
# so `pipeline.explain.settings` (the options, checked by the CLI and job files) loads without torch.
_DEFINED_IN = {
    "Attribution": "attribution",
    "SmoothGrad": "attribution",
    "CAM": "cam",
    "CAMError": "cam",
    "find_gap_linear_head": "cam",
    "CausalMetric": "causal",
    "DeepDream": "deepdream",
    "GradCAM": "gradcam",
    "Occlusion": "occlusion",
    "OcclusionResult": "occlusion",
    "Saliency": "saliency",
}
# The map methods by the name `--methods` and job files use (pipeline.explain.settings.METHODS, in its order).
_METHOD_CLASSES = {"saliency": "Saliency", "occlusion": "Occlusion", "cam": "CAM", "gradcam": "GradCAM"}

__all__ = ["METHODS", *_DEFINED_IN]


def __getattr__(name: str):
    if name == "METHODS":
        from pipeline.explain.settings import METHODS as names

        methods = {method: __getattr__(_METHOD_CLASSES[method]) for method in names}
        globals()["METHODS"] = methods
        return methods
    if name in _DEFINED_IN:
        value = getattr(importlib.import_module(f"pipeline.explain.{_DEFINED_IN[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pipeline.explain' has no attribute {name!r}")
