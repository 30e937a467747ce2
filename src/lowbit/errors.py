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
