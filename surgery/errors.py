"""The one error type users see: a single line naming what is wrong and how to fix it."""


class SurgeryError(Exception):
    """Bad input (plan, checkpoint, arguments). The CLI prints it as one line and exits with
    `exit_code`: 2 for bad input; subclasses for failures that are not the input's fault."""

    exit_code = 2


class Interrupted(SurgeryError):
    """The run was stopped (Ctrl-C, SIGTERM); what it finished is kept for --resume."""

    exit_code = 130


def one_line(text: str) -> str:
    """Messages quote users' files, keys and parser output; a newline in one must not split the error line."""
    return " ".join(part.strip() for part in text.splitlines())
