"""User-facing errors: the CLI prints their message as one line and exits 2 (or the error's ``exit_code``),
without a traceback."""


class BraidError(Exception):
    """Bad input (config, data, checkpoint) as opposed to a bug."""


class ConfigError(BraidError, ValueError):
    """A configuration key has a wrong name, type or value; the message names the key."""


class DataSourceError(BraidError, ValueError):
    """A data source or tokenizer cannot be read; the message names the file or dataset."""


class CheckpointError(BraidError, RuntimeError):
    """A checkpoint cannot be used; the message names its directory."""


class NonFiniteLossError(BraidError):
    """``train.max_nan_iterations`` consecutive non-finite steps: the run stops, its checkpoints intact."""

    exit_code = 3  # the CLI's exit status (README, Launch: signals); 2 stays "bad input"
