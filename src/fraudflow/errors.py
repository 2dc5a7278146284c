"""The one exception tree of fraudflow.

    FraudflowError                 anything fraudflow raises on purpose
    ├── ConfigError                a run configuration or flag is invalid
    ├── DataError                  an input table breaks its contract
    │   └── SchemaError            a column is missing or has the wrong type
    ├── ArtifactError              a run folder or model bundle is missing or unreadable
    │   └── RunCheckError          a run fails a check before it may serve (``check`` names it)
    ├── TrainingError              training cannot go on (e.g. no positive labels)
    └── ServeError                 a request the decision service cannot complete: its HTTP
                                   status, a fixed detail string and a metric kind

The CLI maps every ``FraudflowError`` to its message and exit code 2, without a traceback.
The decision service maps a ``ServeError`` to its status and detail (``fraudflow.serve.app``);
its cause goes to the log, never to the client.
"""

__all__ = [
    "ArtifactError",
    "ConfigError",
    "DataError",
    "FraudflowError",
    "RunCheckError",
    "SchemaError",
    "ServeError",
    "TrainingError",
]


class FraudflowError(Exception):
    """Base of every error fraudflow raises on purpose."""

    exit_code = 2


class ConfigError(FraudflowError):
    """A configuration value or command-line flag is invalid."""


class DataError(FraudflowError):
    """An input table breaks its contract (values, duplicates, ordering)."""


class SchemaError(DataError):
    """A required column is missing or cannot be read as its type."""


class ArtifactError(FraudflowError):
    """A run folder, checkpoint or model bundle is missing or unreadable."""


class RunCheckError(ArtifactError):
    """A run fails one of the checks made before it may serve; ``check`` is a fixed name for
    which one (the service maps it to a fixed detail), the message says what was found."""

    def __init__(self, check: str, message: str) -> None:
        super().__init__(message)
        self.check = check


class TrainingError(FraudflowError):
    """Training cannot proceed with the given data or settings."""


class ServeError(FraudflowError):
    """A request the service cannot complete: HTTP status, fixed detail, metric kind."""

    def __init__(self, status: int, detail: str, kind: str) -> None:
        super().__init__(detail)
        self.status, self.detail, self.kind = status, detail, kind
