"""Error types and the exit codes the CLI maps them to.

``UserError`` is bad input (missing file, corrupt weights, unknown profile, bad
override, unsupported architecture, disk full): the CLI prints its message as one
line on stderr and exits 2. Anything else escaping a command is an internal error
(exit 1).
"""

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USER = 2
EXIT_INTERRUPTED = 130


class CompressError(Exception):
    """Base class of the errors this package raises on purpose."""

    exit_code = EXIT_INTERNAL


class UserError(CompressError):
    """The input is wrong; the message says what and how to fix it (one line)."""

    exit_code = EXIT_USER


def one_line(message: object) -> str:
    """Fold a message onto one line (error text from libraries can span many)."""
    text = " ".join(str(message).split())
    return text if len(text) <= 600 else text[:597] + "..."
