"""CSML: collaborative and secure machine learning."""

__version__ = "0.1.0"
