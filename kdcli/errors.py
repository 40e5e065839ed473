"""Every error kdcli turns into one line for the user, in one place.

The CLI maps them to exit codes: a problem the user can fix (ConfigError, DataError,
RunError, UsageProblem) is exit 2; a run that broke down (Diverged) is exit 1.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A problem with the experiment a user can fix; its message is one line."""


class DataError(RuntimeError):
    """A missing or broken data file; the message is one line naming the file."""


class RunError(RuntimeError):
    """A missing, broken or mismatched run directory or checkpoint (one line)."""


class WriteError(RunError):
    """A file could not be written (no permission, full disk); the previous version is intact."""


class UsageProblem(Exception):
    """A user-fixable problem found by the CLI itself (exit 2)."""


class Diverged(RuntimeError):
    """Training broke down (the loss became NaN or infinite, or the network died);
    the state of the last good epoch is kept."""

    def __init__(self, epoch: int, step: int, what: str = "loss became NaN or infinite"):
        super().__init__(f"{what} at epoch {epoch}, step {step}")
        self.epoch, self.step, self.what = epoch, step, what

    def __reduce__(self):  # rebuilt from its own arguments, not the message: it travels back from Ray workers
        return Diverged, (self.epoch, self.step, self.what)
