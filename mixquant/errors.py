"""The one exception type a user mistake raises; the CLI prints it as a single line and exits 2."""


class MixquantError(Exception):
    """Bad input or an impossible request. The message names the file or tensor and the problem."""
