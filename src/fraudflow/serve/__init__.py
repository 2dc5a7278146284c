"""The real-time decision service: the HTTP app, its state stores, policy and audit.

Import the pieces from their modules (e.g. ``fraudflow.serve.state``); the package itself
exports nothing yet.
"""

__all__: list[str] = []
