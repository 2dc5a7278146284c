"""fraudflow: from payment-transaction logs to fraud decisions."""

__all__ = ["__version__"]

__version__ = "0.1.0"
