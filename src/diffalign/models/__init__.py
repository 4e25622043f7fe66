"""Policy adapters: the built-in tiny ShapesWorld model (and, later, diffusers models)."""

from diffalign.models.base import Policy
from diffalign.models.text import Conditioning

__all__ = ["Conditioning", "Policy"]
