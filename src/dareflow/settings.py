"""Where dareflow finds what it ships and where it keeps what it makes.

Shipped files (recipes, eval suites, evaluation data) are package data, located through
the installed package, so a wheel install works from any folder. Nothing else in the
code base locates files relative to ``__file__``; ``configs/`` is mapped into the
package as ``dareflow.configs`` (see pyproject.toml).
"""

import os
import tempfile
from importlib import resources
from pathlib import Path

#: the shipped ``configs/`` tree (recipes, sweeps, grids, suites) as a folder on disk
CONFIGS_DIR = Path(str(resources.files("dareflow.configs")))
SUITES_DIR = CONFIGS_DIR / "suites"
DEMO_RECIPE = CONFIGS_DIR / "demo" / "demo.yaml"
#: shipped evaluation data (TruthfulQA MC rows, the demo skills' eval sets) and its attribution
DATA_DIR = Path(__file__).resolve().parent / "evaluation" / "data"


def default_store() -> str:
    """``$DAREFLOW_STORE``, else a folder in the user's cache."""
    return os.environ.get("DAREFLOW_STORE") or os.path.join(
        os.path.expanduser("~"), ".cache", "dareflow"
    )


def cache_dir() -> Path:
    """This machine's local cache (``$DAREFLOW_CACHE``, else ``$TMPDIR/dareflow-cache``)."""
    return Path(os.environ.get("DAREFLOW_CACHE") or os.path.join(tempfile.gettempdir(),
                                                                 "dareflow-cache"))
