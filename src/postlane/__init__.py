"""Postlane: a self-hosted, multi-tenant email sending platform."""

from postlane.errors import PostlaneError

__version__ = "0.1.0"
__all__ = ["PostlaneError", "__version__"]
