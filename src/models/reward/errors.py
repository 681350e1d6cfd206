"""The judge's one error family. Every error the library raises on purpose is a `JudgeError`, so a
caller (the CLI, the HTTP service, a user's script) catches that one type; the subclass says what
kind of problem it is, and the message names the device, the PID, the item and the fix.

The subclasses also derive from the builtins they replaced, so code that caught those still
catches them: a wrong setting was a ValueError or, for a wrong type or an unknown parameter, a
TypeError; a closed or dead judge a RuntimeError. Errors of one item inside a call are not raised:
they become that item's result (`score=None`, `error`, `error_kind`). Nothing here imports anything.
"""


class JudgeError(Exception):
    """Base of every error the judge raises on purpose."""


class JudgeConfigError(JudgeError, ValueError, TypeError):
    """A setting is wrong (config file, --set override, a parameter): fix the setting named."""


class JudgeInputError(JudgeError, ValueError):
    """The input cannot be read (a manifest, a results file, an image, a request body)."""


class JudgeStartError(JudgeError, RuntimeError):
    """The judge could not start (a worker process, a Ray actor): the message names where and why."""

    who = "the judge"  # what could not start, as the CLI says it


class JudgeUnavailable(JudgeError, RuntimeError):
    """The judge stopped answering (a worker died, a remote service failed or refused), or was
    closed before the call."""


def exit_code(e: JudgeError) -> int:
    """The CLI's exit status for `e`: 2 for a problem in what the user gave, 1 otherwise."""
    return 2 if isinstance(e, (JudgeConfigError, JudgeInputError)) else 1
