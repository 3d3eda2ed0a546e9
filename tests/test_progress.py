"""Progress while a run runs: a line per finished claim everywhere but under -q, a bar on a
terminal only, and no library progress bars ("Loading weights") unless asked.

The bar's delay (2 s by default) is set to 0 here, so a short claim shows it: the tests do not
depend on a claim happening to run longer than the threshold."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from harness.testing import write_spec

REPO = Path(__file__).resolve().parents[1]
BAR = "spec::sweep: "   # tqdm draws the bar as "<label>: <done>/<total> cells ..."

CLAIMS = """\
- id: sweep
  measure: patch_sweep
  from: b
  into: a
  site: resid_pre
  over: [layer, pos]
  expect: {max: {"<": 100}}
- id: diff
  measure: logit_diff
  model: a
  expect: {"<": 1000}
"""


@pytest.fixture
def spec(tmp_path, tiny_checkpoints):
    path = write_spec(tmp_path, tiny_checkpoints["a"], """\
        - text: "This movie was"
          answer: " bad"
          foil: " good"
        """, CLAIMS)
    text = path.read_text().replace(
        "models:\n", f'models:\n  b: {{path: "{tiny_checkpoints["b"]}"}}\n')
    path.write_text(text)
    return path


def _env(**extra) -> dict:
    env = {"PYTHONPATH": str(REPO), "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "HF_HUB_OFFLINE": "1", "HARNESS_PROGRESS_DELAY": "0", "TERM": "xterm",
           "COLUMNS": "120", "HOME": os.environ.get("HOME", "/tmp")}
    env.update(extra)
    return env


def _harness(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from harness.cli import main; "
            "sys.exit(main(sys.argv[1:]))", *args]


def _run_in_terminal(args: list[str], env: dict, timeout: float = 300) -> tuple[int, str]:
    """Run a command with stdout and stderr on a pseudo-terminal; (exit code, all output)."""
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen(args, stdin=secondary, stdout=secondary, stderr=secondary,
                            cwd=REPO, env=env, close_fds=True)
    os.close(secondary)
    chunks = []
    while True:
        ready, _, _ = select.select([primary], [], [], timeout)
        if not ready:
            proc.kill()
            raise TimeoutError("no output from the run")
        try:
            data = os.read(primary, 65536)
        except OSError:          # the terminal closed: the process ended
            break
        if not data:
            break
        chunks.append(data)
    os.close(primary)
    return proc.wait(timeout=timeout), b"".join(chunks).decode(errors="replace")


def test_a_terminal_shows_a_bar_and_a_line_per_claim(spec):
    code, out = _run_in_terminal(_harness("run", str(spec)), _env())
    assert code == 0, out
    assert BAR in out and "cells" in out                  # the sweep's bar, labelled
    assert "PASSED   spec::sweep (" in out and "PASSED   spec::diff (" in out
    assert "Loading weights" not in out


def test_a_quiet_terminal_shows_neither(spec):
    code, out = _run_in_terminal(_harness("run", str(spec), "-q"), _env())
    assert code == 0, out
    assert BAR not in out and "PASSED   spec::" not in out
    assert "2 claims: 2 passed" in out                     # the report itself still prints


def test_piped_output_has_lines_but_no_bars(spec):
    done = subprocess.run(_harness("run", str(spec)), cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = done.stdout + done.stderr
    assert "PASSED   spec::sweep (" in done.stderr and "PASSED   spec::diff (" in done.stderr
    assert BAR not in out and "\r" not in out
    assert "Loading weights" not in out                    # transformers' bar is kept out


def test_library_bars_show_when_asked(spec):
    done = subprocess.run(_harness("run", str(spec), "-v"), cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Loading weights" in done.stderr


def test_steps_count_into_the_running_bar_only():
    import io

    from harness import progress

    progress.steps(5)(5)                                   # no bar: nothing happens
    stream = io.StringIO()
    with progress.showing_bar("x::y", stream, delay=0) as bar:
        count = progress.steps(4, "senders")
        count(1)
        count(3)
        progress.steps(2)(2)
        assert (bar.n, bar.total, bar.unit) == (6, 6, "senders")
    assert progress.steps(3) is progress._nothing
    assert "x::y" in stream.getvalue()


def test_pytest_reports_each_claims_seconds(spec):
    done = subprocess.run([sys.executable, "-m", "pytest", str(spec), "-v", "-p",
                           "no:cacheprovider"], cwd=spec.parent, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if "spec::sweep" in line]
    assert any("PASSED" in line and " s)" in line for line in lines), done.stdout
