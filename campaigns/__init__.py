"""Campaign delivery on Temporal: the library shared by the CLI, the worker and the tests."""

__version__ = "0.1.0"
