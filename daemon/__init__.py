"""beamlens daemon: sources, router, sinks and lifecycle."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("beamlens")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0+unknown"

