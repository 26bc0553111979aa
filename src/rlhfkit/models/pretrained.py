"""What ``from_pretrained`` is given: a local folder, or a hub id.

transformers reads a missing local folder as a hub id and answers with a repo-id or network error;
a name that can only be a path (``/``, ``.`` or ``~`` first, or more than one ``/``) is checked here
instead, so that the error says the folder does not exist.
"""

from __future__ import annotations

import os


def pretrained_source(name_or_path: str | os.PathLike, what: str = "model") -> str:
    """``name_or_path`` for ``from_pretrained`` (``~`` expanded); FileNotFoundError when it names a local
    folder that does not exist."""
    source = os.path.expanduser(str(name_or_path))
    if os.path.isdir(source):
        return source
    if os.path.exists(source):
        raise FileNotFoundError(f"{source}: a file, not a {what} folder")
    if source.startswith(("/", ".")) or source.count("/") > 1:
        raise FileNotFoundError(f"{source}: no such {what} folder (a local path; hub ids look like org/name)")
    return source
