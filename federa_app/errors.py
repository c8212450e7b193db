"""The one error type users see: a single line naming the bad value and what would be valid."""


class FederaError(Exception):
    """A user-facing error; the CLI prints its message as one line and exits with code 2."""


class ConfigError(FederaError):
    """A run-config key or value is unknown, of the wrong type or out of range."""


class AssetError(FederaError):
    """A model or dataset asset is missing, not fetchable offline, or fails its checksum."""


class DataError(FederaError):
    """A dataset lacks a needed column, or a partition comes out empty."""


class RunFailed(FederaError):
    """The run started but did not finish well (ServerApp error, or a round without results)."""
