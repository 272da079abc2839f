"""The embedding worker of `atlas score`: image bytes in, one embedding per item out (testable without Ray).

An item is a whole image (``w:<image_key>``: shorter side scaled to the similarity model's input, centre crop)
or one unit's receptive-field crop of an image (``c:<layer>:<unit>:<side>:<rank>``: the scan's box, in original
pixels, scaled to the model's input square). Each whole image is embedded once, whatever number of units use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from pipeline.render.crops import crop_box, open_rgb
from pipeline.score.similarity import SimilarityConfig, load_similarity


@dataclass
class EmbedTask:
    items: list[tuple[str, str, tuple[int, int, int, int] | None]]  # (item id, image_key, box or None: whole)
    images: dict[str, bytes] = field(default_factory=dict)  # encoded bytes of the items' images


@dataclass
class EmbedResult:
    ids: list[str]
    embeddings: np.ndarray  # (len(ids), d) float32, unit length
    failed: list[str]  # items whose image could not be read, decoded or cropped


def whole_image(image: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size` (bilinear), then the centre `size` x `size`."""
    scale = size / min(image.width, image.height)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((width, height), Image.BILINEAR)
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


class Embedder:
    def __init__(self, config: SimilarityConfig):
        self.model = load_similarity(config)

    @property
    def name(self) -> str:
        return self.model.name

    def similarity_name(self) -> str:
        """The loaded model's name (a Ray actor's properties are not callable remotely)."""
        return self.model.name

    def __call__(self, task: EmbedTask) -> EmbedResult:
        size = self.model.image_size
        ids, pictures, failed = [], [], []
        opened: dict[str, Image.Image | None] = {}
        for item_id, key, box in task.items:
            if key not in opened:
                try:
                    opened[key] = open_rgb(task.images[key]) if key in task.images else None
                except Exception:  # noqa: BLE001 - an unreadable original: the item is reported, not fatal
                    opened[key] = None
            image = opened[key]
            if image is None:
                failed.append(item_id)
                continue
            try:
                picture = whole_image(image, size) if box is None else crop_box(image, box).resize((size, size))
            except ValueError:
                failed.append(item_id)
                continue
            ids.append(item_id)
            pictures.append(picture)
        embeddings = self.model.embed(pictures) if pictures else np.zeros((0, 0), np.float32)
        return EmbedResult(ids, embeddings, failed)

    def process(self, task: EmbedTask, _start=None, _end=None) -> EmbedResult:
        """WorkerPool entry point (the task arrives as the block of a one-block bundle)."""
        return self(task)

    def flush(self) -> None:
        """Nothing is held between tasks (WorkerPool's retire hook)."""
        return None
