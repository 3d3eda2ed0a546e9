"""interp-harness: claims about the insides of language models, checked as tests."""

from harness.spec import load_spec
from harness.version import __version__


def evaluate(path, device: str | None = None):
    """Evaluate every claim of one spec file; returns a runner.SpecResult."""
    from pathlib import Path

    from harness.runner import run_spec_file
    from harness.session import Session

    return run_spec_file(Path(path), Session(device=device))


def check(spec, models=None, claims=None, **kwargs):
    """The notebook API: see harness.notebook.check."""
    from harness.notebook import check as _check

    return _check(spec, models, claims, **kwargs)


def claim(id: str, measure: str, expect: dict, **fields) -> dict:
    """A claim built in Python with the YAML fields; see harness.notebook.claim."""
    from harness.notebook import claim as _claim

    return _claim(id, measure, expect, **fields)


def init_notebook():
    """plotly.js for the notebook, once: see harness.notebook.init_notebook."""
    from harness.notebook import init_notebook as _init

    return _init()


__all__ = ["load_spec", "evaluate", "check", "claim", "init_notebook", "__version__"]
