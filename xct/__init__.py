"""xct: few-view X-ray to CT reconstruction in JAX."""

__version__ = "0.1.0"
