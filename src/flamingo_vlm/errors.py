"""Error types the command line maps to exit codes (see :mod:`flamingo_vlm.cli`), kept below the
modules that raise them so that nothing imports the CLI."""


class UsageError(ValueError):
    """Bad command-line input: flags that contradict each other or values out of range (exit code 2)."""
