"""The one cache folder: ``$FEATUREBEAM_CACHE``, else the platform's cache folder
(``$XDG_CACHE_HOME``, else ``~/.cache``) + ``featurebeam``.

It holds the offline sample weights, local copies of remote weights and heads (``weights/``) and
the frozen graphs of the Keras applications backbones (``weights/graphs/``). Every job's
``--cache-dir`` defaults to it.
"""

import os

CACHE_ENV = "FEATUREBEAM_CACHE"


def cache_dir(*parts: str) -> str:
    """The cache folder, or a folder inside it: ``cache_dir("weights")``."""
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "featurebeam",
    )
    return os.path.join(root, *parts)
