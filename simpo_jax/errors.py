"""The errors a user can act on: run.py prints them as one line, without a traceback."""


class UserError(ValueError):
    """A mistake in the config, the data or the output folder; the message names it and the fix.

    run.py prints it as one line (`run.py: error: ...`, exit status 2) without a traceback; any
    other exception is a bug and keeps its traceback.
    """


class HubError(UserError):
    """A model, tokenizer or data set that cannot be had from the Hub; the message names the fix."""


class RunUnhealthy(Exception):
    """The run stopped on a health sign (health.py); the message (one line) names the step, the
    sign, the last healthy checkpoint and the advice. run.py exits 3 on it, without a traceback."""
