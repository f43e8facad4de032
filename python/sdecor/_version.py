"""The package's version, one place: ``sdecor.__version__``, ``sdecor info`` and setup.py read it here."""

__version__ = "0.1.0"
