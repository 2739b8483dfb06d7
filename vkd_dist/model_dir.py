"""A model directory, as `vkd-export` writes it and `VKDImageClassifier.from_pretrained` reads it: its file
names, its format tag, and the error that names the file a broken one fails on. Light (no torch), so the
command-line tools can name these before anything heavy is loaded.

    DIR/config.json          architecture, label names, preprocessing, inference mode, provenance
    DIR/model.safetensors    the image path only, fp32
    DIR/README.md            the model card
"""

from __future__ import annotations

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
FORMAT = "vkd_dist.image_classifier"
FORMAT_VERSION = 1


class ModelDirError(ValueError):
    """A model directory that cannot be loaded; the message names the file."""
