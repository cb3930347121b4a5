"""Model sources: a Hub repo id, an ``s3://`` prefix or a local folder, pinned to a revision and
mirrored into the artifact store once per revision. ``spec`` parses what the recipe wrote,
``resolve`` pins a source and chooses the files a merge needs, ``transfer`` copies them into the
store (through ``store``), and ``mirror`` ties these together for one model or every model of a
recipe. No Prefect here: the merge flow's tasks (``dareflow.tasks.merge``) wrap
:func:`mirror_model` and :func:`collect_sources`.
"""

from dareflow.sources.mirror import (
    MirrorResult,
    collect_sources,
    mirror_model,
    mirror_source,
    source_specs,
)
from dareflow.sources.resolve import ResolvedSource, resolve
from dareflow.sources.spec import Source, parse_source

__all__ = [
    "MirrorResult",
    "ResolvedSource",
    "Source",
    "collect_sources",
    "mirror_model",
    "mirror_source",
    "parse_source",
    "resolve",
    "source_specs",
]
