"""The one exception type whose message is meant for the user.

It lives apart from the stage runner so the library layers under it (data formats, readers,
manifests) can raise it without importing the runner.
"""


class StageError(RuntimeError):
    """A failure with a message meant for the user (shown without a traceback by the CLI, exit 2)."""
