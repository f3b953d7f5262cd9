"""The one error type the CLI turns into a one-line message and a non-zero exit."""


class PipelineError(Exception):
    """A problem with the user's input or files; the message says where and what to do."""
