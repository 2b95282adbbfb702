"""The one exception type that CLIs turn into a single error line and a non-zero exit."""


class DPrunerError(Exception):
    """A problem the user can fix (bad input, missing file, conflicting output).

    The message must name the file/key/value at fault and say what is expected.
    """
