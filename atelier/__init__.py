"""atelier: attribute-to-image retrieval."""

__version__ = "0.1.0"
