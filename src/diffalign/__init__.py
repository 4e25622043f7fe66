"""diffalign: RL and preference fine-tuning for text-to-image diffusion and flow models."""

__version__ = "0.1.0"
