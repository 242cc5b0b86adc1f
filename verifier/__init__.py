"""relrobust: verify a classifier on DLV-style regions and compare it with its quantized copies."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("relrobust")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+src"

__all__ = ["__version__"]
