"""The one error type users see: a single line naming what is wrong and how to fix it."""


class SurgeryError(Exception):
    """Bad input (plan, checkpoint, arguments). The CLI prints it as one line and exits 2."""
