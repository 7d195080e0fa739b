"""zimage-lora: train and run LoRAs for the Z-Image family of text-to-image models."""

__version__ = "0.1.0"
