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


def _pytest(*args: str) -> list[str]:
    return [sys.executable, "-m", "pytest", *args, "-p", "no:cacheprovider"]


def test_pytest_on_a_terminal_shows_a_bar_below_its_line(spec):
    """The bar takes the line below pytest's and, once cleared, the cursor goes back up to the
    end of pytest's line, so pytest's next word lands where it would have."""
    code, out = _run_in_terminal(_pytest(str(spec)), dict(_env(), PYTHONPATH=str(REPO)))
    assert code == 0, out
    assert BAR in out and "cells" in out
    assert "\x1b[A" in out                                 # back up to pytest's line
    assert "interp-harness claims" in out                  # the run's own report


@pytest.mark.parametrize("how", ["-q", "piped", "xdist"])
def test_pytest_shows_no_bar_quiet_piped_or_in_xdist_workers(spec, how):
    args = _pytest(str(spec), *(["-q"] if how == "-q" else []),
                   *(["-n", "1"] if how == "xdist" else []))
    if how == "piped":
        done = subprocess.run(args, cwd=REPO, env=_env(), capture_output=True, text=True,
                              timeout=300)
        code, out = done.returncode, done.stdout + done.stderr
        assert "\r" not in out
    else:
        code, out = _run_in_terminal(args, _env())
    assert code == 0, out
    assert BAR not in out and "\x1b[A" not in out


def test_a_bar_below_a_line_returns_to_its_end_and_a_short_claim_writes_nothing():
    import io

    from harness import progress

    stream = io.StringIO()
    below = progress.BarBelowLine(stream, lambda: 7)
    with progress.showing_bar("x::y", below, delay=60):   # a claim shorter than the delay
        progress.steps(3)(3)
    below.back_to_line()
    assert stream.getvalue() == ""                         # nothing drawn, nothing to undo
    with progress.showing_bar("x::y", below, delay=0):
        progress.steps(3)(3)
    below.back_to_line()
    out = stream.getvalue()
    assert out.startswith("\n") and "x::y" in out          # the bar, on the next line
    assert out.endswith("\r\x1b[A\x1b[7C")                 # then back up, to column 7


@pytest.mark.parametrize("asked", [False, True])
def test_benches_keep_transformer_lens_patching_bars_out_unless_asked(tiny_checkpoints, capsys,
                                                                      monkeypatch, asked):
    """bench_patching calls TransformerLens's patching functions, which draw a tqdm bar per
    sweep; `quiet_libraries(transformer_lens_patching=True)` keeps them out of its tables."""
    import transformer_lens.patching as tl_patching
    from _tiny_models import load_bridge

    from harness import progress

    tiny_bridge = load_bridge(tiny_checkpoints["a"])
    monkeypatch.setattr(tl_patching, "tqdm", tl_patching.tqdm)   # restored after the test
    if asked:
        monkeypatch.setenv(progress.LIBRARY_ENV, "1")
    progress.quiet_libraries(transformer_lens_patching=True)
    tokens = tiny_bridge.to_tokens(["This movie was"])
    _, cache = tiny_bridge.run_with_cache(tokens)
    capsys.readouterr()
    tl_patching.get_act_patch_resid_pre(tiny_bridge, tokens, cache,
                                        lambda logits: logits[0, -1, 0] - logits[0, -1, 1])
    err = capsys.readouterr().err
    assert ("it/s" in err or "s/it" in err) == asked, err
