"""DreamPainter: product-background inpainting controlled by a text prompt and a reference image."""

__version__ = "0.1.0"
