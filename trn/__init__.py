"""TRN: clean adversarial images with a Two-stream Restoration Network before they reach a classifier."""

__version__ = "0.1.0"
