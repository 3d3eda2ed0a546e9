"""interp-harness: claims about the insides of language models, checked as tests."""

__version__ = "0.1.0"

from harness.spec import load_spec  # noqa: E402


def evaluate(path, device: str | None = None):
    """Evaluate every claim of one spec file; returns a runner.SpecResult."""
    from pathlib import Path

    from harness.runner import run_spec_file
    from harness.session import Session

    return run_spec_file(Path(path), Session(device=device))


__all__ = ["load_spec", "evaluate", "__version__"]
