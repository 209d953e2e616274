"""The package version: from the installed metadata, else the source tree's."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dasm")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.1.0"
