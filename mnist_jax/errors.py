"""Errors a user can fix: the command-line entry points print them as one line and exit 2."""


class UserError(Exception):
    """Bad input (flag, config, data file, checkpoint, path). The message names the problem."""


class ConfigError(UserError, ValueError):
    """A configuration value that cannot work."""


class DataError(UserError):
    """A missing, truncated or corrupt dataset file."""


class CheckpointError(UserError):
    """A checkpoint that cannot be written or read back."""


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""
