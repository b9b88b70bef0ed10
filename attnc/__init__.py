"""attnc: a compiler for attention variants written as cascades of Einsums."""
__version__ = "0.1.0"
