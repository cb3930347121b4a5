"""dareflow: DARE merging of homologous fine-tuned language models as a Prefect 3 pipeline."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dareflow")
except PackageNotFoundError:  # a source checkout that was never installed
    __version__ = "0+unknown"
