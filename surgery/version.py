"""The version surgery reports and records in every output's surgery.json."""

__version__ = "0.1.0"
