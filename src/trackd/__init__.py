"""trackd: log from training code in microseconds; a local daemon delivers everything.

This module is the public client API and nothing else (see `__all__`).
"""

from trackd.client import alert, finish, init, log
from trackd.client.media import Histogram, Image, Table, Video
from trackd.client.run import Run

__version__ = "0.1.0"

__all__ = [
    "Histogram",
    "Image",
    "Run",
    "Table",
    "Video",
    "__version__",
    "alert",
    "finish",
    "init",
    "log",
]
