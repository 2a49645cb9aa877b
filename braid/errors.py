"""User-facing errors: the CLI prints their message as one line and exits 2, without a traceback."""


class BraidError(Exception):
    """Bad input (config, data, checkpoint) as opposed to a bug."""


class ConfigError(BraidError, ValueError):
    """A configuration key has a wrong name, type or value; the message names the key."""


class DataSourceError(BraidError, ValueError):
    """A data source or tokenizer cannot be read; the message names the file or dataset."""


class CheckpointError(BraidError, RuntimeError):
    """A checkpoint cannot be used; the message names its directory."""
