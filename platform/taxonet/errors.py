"""Error types shown to users as one clear line by the CLI (tracebacks only with ``-v``)."""

from taxonet.config import ConfigError
from taxonet.taxonomy import TaxonomyError, UnknownTaxonError


class DatasetError(ValueError):
    """A dataset that cannot be read or written: missing dataset.json, bad labels, unreadable source."""


class StorageError(RuntimeError):
    """Storage unreachable or refused: missing/wrong credentials, missing bucket, endpoint down."""


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or does not fit the code."""


UserFacingError = (ConfigError, TaxonomyError, UnknownTaxonError, DatasetError, StorageError, CheckpointError,
                   FileNotFoundError)
