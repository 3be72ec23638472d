"""Vision data and tools, not tied to a model family.

``preprocess``: resize / centre crop / normalise with torch (CLIP, ViT and ImageNet settings in
``PROCESSORS``, the first two read from their families' registry records); ``shapes``: the built-in seeded generator of coloured shapes with captions;
``demo``: the tiny ViT and CLIP trainings behind ``lmzoo train vit|clip``; ``plots``: their PNGs.
"""

from lmzoo.vision.preprocess import PROCESSORS, ImageProcessor, read_image

__all__ = ["PROCESSORS", "ImageProcessor", "read_image"]
