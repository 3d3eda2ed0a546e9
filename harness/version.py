"""The harness's version, in a module of its own so that reports and baselines can read it
without importing the package's front door (which imports the spec layer)."""

__version__ = "0.1.0"
