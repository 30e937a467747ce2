"""Errors lowbit raises for bad input: one family so the CLI can print them without a traceback."""


class LowbitError(Exception):
    """Base class for user-facing errors (bad path, bad format name, bad weights...)."""


class UnknownFormatError(LowbitError, KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class UnsupportedModelError(LowbitError):
    pass


class BadWeightsError(LowbitError):
    pass


class AssetError(LowbitError):
    pass


class BadFileError(LowbitError):
    """A file lowbit reads (checkpoint, config, GGUF, text) is missing, damaged, or disagrees with another one; the
    message names the file and, where one is at fault, the tensor or field."""


class DestinationError(LowbitError):
    """The output cannot be written where asked (missing permission, read-only or full file system); nothing
    partial is left behind."""


def one_line(e: BaseException) -> str:
    """``Type: first line of the message``: how a third-party exception is quoted inside a one-line error."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):  # "Validation error for field 'x':" says what only next
        lines[0] = f"{lines[0]} {lines[1]}"
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
