"""Where portwatch's data files are: the BPF sources (``bpf/*.c``, ``bpf/*.h``) and the schema
(``init.sql``), found from this package's location, never from the working directory.

In a checkout (or an editable install) they sit beside the package, at the repository root; a built
wheel carries copies inside the package, under ``app/_data/`` (setup.py's build step puts them there),
because a wheel installs nothing beside ``app/`` that the package could find again.
"""
from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
# sys.path entry that holds the package: what a child `python -m app...` needs on its PYTHONPATH
IMPORT_ROOT = PACKAGE_DIR.parent
INSTALLED_DATA = PACKAGE_DIR / "_data"


def data_path(name: str) -> Path:
    """The installed copy of ``name`` (a path relative to the repository root) when this package is
    an installed wheel, else the checkout's own file."""
    inside = INSTALLED_DATA / name
    return inside if inside.exists() else IMPORT_ROOT / name


BPF_DIR = data_path("bpf")
INIT_SQL = data_path("init.sql")
