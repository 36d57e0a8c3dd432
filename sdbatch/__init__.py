"""sdbatch: YAML job files to images, videos and datasets with Stable Diffusion."""

from .hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["hookimpl", "__version__"]
