"""esmail: receive data feeds by email and store them as clean UTF-8 CSV."""

__version__ = "0.1.0"
