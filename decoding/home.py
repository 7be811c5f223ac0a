"""`$ALIGNER_HOME`: where this project keeps what it makes once per machine (the converted
default model, the default SQLite store). Default: `~/.cache/aligner`."""

from __future__ import annotations

import os
from pathlib import Path


def aligner_home() -> Path:
    return Path(os.environ.get("ALIGNER_HOME", Path.home() / ".cache" / "aligner"))
