"""The one folder where adam-mini-lab keeps files worth keeping between runs.

Both caches follow this rule: the compiled CPU kernel (:mod:`optimizer.cpu_fused`) and the
corpus tokens (``lab.data.Corpus.stdlib``). It lives here because ``optimizer`` may not import
``lab``, while ``lab`` may import ``optimizer``.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """``$ADAM_MINI_LAB_CACHE`` if set, else ``$XDG_CACHE_HOME/adam-mini-lab``, else
    ``~/.cache/adam-mini-lab``.

    An empty variable counts as unset, and so does a relative ``XDG_CACHE_HOME`` (the XDG Base
    Directory specification says to ignore it), so the cache never lands in the working folder.
    """
    own = os.environ.get("ADAM_MINI_LAB_CACHE")
    if own:
        return Path(own)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "adam-mini-lab"
