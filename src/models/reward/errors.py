"""The judge's one error family. Every error the library raises on purpose to its caller is a
`JudgeError`, so a caller (the CLI, the HTTP service, a user's script) catches that one type; the
subclass says what kind of problem it is, and the message names the device, the PID, the item and
the fix.

The subclasses also derive from the builtins they replaced, so code that caught those still
catches them: a wrong setting was a ValueError or, for a wrong type or an unknown parameter, a
TypeError; a closed or dead judge a RuntimeError. Errors of one item inside a call are not raised
to the caller: they are raised as `ItemFailed` where the item's problem is found and caught by the
call, and become that item's result (`score=None`, `error`, `error_kind`). Nothing here imports
anything.
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


class ItemFailed(Exception):
    """One item (or one rubric part's prompt of it) failed; the rest of the call goes on.

    Raised where the problem is found (preparing the item, running its batch, a chat request, a
    served judge's answer) and caught by the call it belongs to, in every host of the judge (local
    batching, the chat route, the openai judge): the item's result gets `error` (the message,
    prefixed with the item's name) and `error_kind` (`kind`: input, image, oom, model,
    prompt_too_long, api, connection, ...), and no score.

    Not a `JudgeError`, on purpose: a `JudgeError` is what reaches the caller, and the CLI turns it
    into a one-line message and an exit status without a traceback (the service logs a model that
    failed to load the same way). An `ItemFailed` that escaped its call would be a defect of the
    library (an item lost from its results), and its message names neither the item nor the fix;
    caught as a JudgeError it would be shown as a user's or the machine's problem with its
    traceback hidden. Left outside the family, it surfaces as the bug it is, as the private
    classes it replaces did.
    """

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


def exit_code(e: JudgeError) -> int:
    """The CLI's exit status for `e`: 2 for a problem in what the user gave, 1 otherwise."""
    return 2 if isinstance(e, (JudgeConfigError, JudgeInputError)) else 1
