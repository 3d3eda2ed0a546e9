"""pytest front end: spec files become collectors, claims become items. Hooks only.

`pytest checks/` collects every spec under the `harness_specs` folder (default `specs`);
`pytest specs/x.yaml` collects one spec. Heavy imports (torch, TransformerLens) are lazy.
"""

from __future__ import annotations

import json
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pytest

SESSION_KEY = pytest.StashKey[object]()
VERDICTS_KEY = pytest.StashKey[list]()
SPEC_ERRORS_KEY = pytest.StashKey[list]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("harness", "interp-harness claims")
    from harness.finish import add_options

    add_options(group.addoption, prefix="harness-")
    group.addoption("--harness-devices", default=None, metavar="LIST",
                    help="with pytest-xdist: devices assigned to workers round-robin, "
                         "e.g. cuda:0,cuda:1")
    parser.addini("harness_specs", "folder of spec files that `pytest <harness_checks>` runs",
                  default="specs")
    parser.addini("harness_checks", "folder whose collection runs every spec",
                  default="checks")


def pytest_configure(config: pytest.Config) -> None:
    from harness.errors import HarnessError
    from harness.finish import Outputs, check_outputs

    try:
        check_outputs(Outputs.from_args(lambda name: config.getoption(f"harness_{name}")),
                      prefix="harness-")
    except HarnessError as exc:
        raise pytest.UsageError(str(exc)) from None
    mismatch = other_checkout(Path(str(config.rootpath)))
    if mismatch:   # shown in the warnings summary, even under -q
        config.issue_config_time_warning(pytest.PytestConfigWarning(mismatch), stacklevel=2)
    config.stash[VERDICTS_KEY] = []
    config.stash[SPEC_ERRORS_KEY] = []
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(XdistHooks(), "harness-xdist")


def other_checkout(rootdir: Path) -> str | None:
    """A warning when pytest runs in a checkout of the harness but imports another one: a
    `.venv` made by one clone's setup is an editable install of that clone, so its pytest run
    from a second clone would silently test the first."""
    import harness

    own = rootdir / "harness" / "__init__.py"
    imported = Path(harness.__file__).resolve()
    if not own.is_file() or own.resolve() == imported:
        return None
    return (f"interp-harness: WARNING: this run imports {imported.parent}, not this checkout's "
            f"{own.parent}; its .venv is another clone's editable install. Run `bash "
            f"scripts/setup.sh` here (a .venv of this checkout) or set PYTHONPATH={rootdir}")


def pytest_report_header(config: pytest.Config) -> str | None:
    return other_checkout(Path(str(config.rootpath)))


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    """`--harness-shard K/N`: keep this part's claims (the same split as `harness run --shard`);
    spec errors and other tests stay in every part."""
    text = config.getoption("harness_shard")
    if not text:
        return
    from harness.errors import HarnessError
    from harness.shard import parse_shard, plan

    try:
        k, n = parse_shard(text)
    except HarnessError as exc:
        raise pytest.UsageError(str(exc)) from None
    claims = [item for item in items if isinstance(item, ClaimItem)]
    specs = list({id(item.spec): item.spec for item in claims}.values())
    chosen = plan(specs, n)[k - 1]
    keep = [item for item in items if not isinstance(item, ClaimItem)
            or (str(item.spec.file), item.index) in chosen]
    kept = set(map(id, keep))
    dropped = [item for item in items if id(item) not in kept]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


def _worker_device(config: pytest.Config) -> str | None:
    """`--harness-devices a,b`: worker gwN takes device N mod len; else --harness-device."""
    devices = config.getoption("harness_devices")
    if not devices:
        return config.getoption("harness_device")
    names = [d.strip() for d in devices.split(",") if d.strip()]
    worker = getattr(config, "workerinput", {}).get("workerid", "gw0")
    return names[int(worker.removeprefix("gw") or 0) % len(names)]


def _session(config: pytest.Config):
    if SESSION_KEY not in config.stash:
        import time

        start = time.perf_counter()
        from harness.session import Session

        config.stash[SESSION_KEY] = session = Session(
            device=_worker_device(config),
            memory_budget_mb=config.getoption("harness_memory_budget_mb"),
            verbose=config.getoption("verbose") > 0,
            update_baselines=config.getoption("harness_update_baselines"),
            allow_remote_code=config.getoption("harness_allow_remote_code"), started=start)
        session.timing["import_s"] += time.perf_counter() - start   # torch, transformers
    return config.stash[SESSION_KEY]


def _is_spec_file(path: Path) -> bool:
    return path.suffix in (".yaml", ".yml") and not path.name.endswith(".baseline.json")


def pytest_collect_directory(path: Path, parent: pytest.Collector):
    root = parent.config.rootpath
    if path.resolve() == (root / parent.config.getini("harness_checks")).resolve():
        return ChecksDirectory.from_parent(parent, path=path)
    return None


def pytest_collect_file(file_path: Path, parent: pytest.Collector):
    if not _is_spec_file(file_path):
        return None
    specs_dir = (parent.config.rootpath / parent.config.getini("harness_specs")).resolve()
    if parent.session.isinitpath(file_path) or specs_dir in file_path.resolve().parents:
        return SpecFile.from_parent(parent, path=file_path)
    return None


class ChecksDirectory(pytest.Directory):
    """The checks folder: collects every spec file under the specs folder."""

    def collect(self):
        from harness.spec import find_specs

        specs_dir = self.config.rootpath / self.config.getini("harness_specs")
        for path in find_specs([specs_dir]) if specs_dir.is_dir() else []:
            yield SpecFile.from_parent(self, path=path)


class SpecFile(pytest.File):
    """One spec file; its single child is named after the spec, so ids read `<spec>::<claim>`."""

    def collect(self):
        from harness.errors import HarnessError, SpecError, safe_text
        from harness.runner import load_and_check

        try:
            spec = load_and_check(self.path, _session(self.config))
        except HarnessError as exc:
            text = safe_text(str(exc) if isinstance(exc, SpecError) else f"{self.path}: {exc}")
            self.config.stash[SPEC_ERRORS_KEY].append({"file": str(self.path), "error": text})
            yield SpecErrorItem.from_parent(self, name="spec-error", error=text)
            return
        node = SpecNode.from_parent(self, name=spec.spec)
        node.spec = spec
        yield node


class SpecNode(pytest.Collector):
    spec = None

    def collect(self):
        for index, claim in enumerate(self.spec.claims):
            yield ClaimItem.from_parent(self, name=claim.id, spec=self.spec, index=index)


class ClaimError(Exception):
    """The claim could not be measured (shown as a pytest error, not a failure)."""


class ClaimFailed(AssertionError):
    """The measurement did not meet the expectation."""


class ClaimItem(pytest.Item):
    def __init__(self, *, spec, index: int, **kwargs):
        super().__init__(**kwargs)
        self.spec, self.index = spec, index
        self.verdict = None

    def setup(self) -> None:
        from harness.claims import ERROR, SKIPPED, evaluate_claim
        from harness.report_text import trust_items

        with _claim_bar(self.config, f"{self.spec.spec}::{self.spec.claims[self.index].id}"):
            self.verdict = verdict = evaluate_claim(self.spec, self.index, _session(self.config))
        self.config.stash[VERDICTS_KEY].append(verdict)
        self.user_properties += [("measure", verdict.measure),
                                 ("measured", json.dumps(verdict.measured, default=str)),
                                 ("expected", json.dumps(verdict.expected, default=str)),
                                 ("status", verdict.status),
                                 ("seconds", round(verdict.seconds, 3))]
        if verdict.extras.get("trust"):   # stability and the like: every scalar key
            self.user_properties.append(("trust", json.dumps(dict(trust_items(
                verdict.extras["trust"])), default=str)))
        if verdict.status == SKIPPED:
            pytest.skip(verdict.message)
        if verdict.status == ERROR:
            raise ClaimError(verdict.message)

    def runtest(self) -> None:
        from harness.claims import FAILED, XFAILED

        if self.verdict.status == XFAILED:
            pytest.xfail(self.verdict.message)
        if self.verdict.status == FAILED:
            raise ClaimFailed(self.verdict.message)

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, ClaimFailed | ClaimError):
            return _describe(self.verdict, excinfo.value)
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        return self.path, (self.spec.line_of(("claims", self.index)) or 1) - 1, \
            f"{self.spec.spec}::{self.name}"


@contextmanager
def _claim_bar(config: pytest.Config, label: str):
    """A long claim's progress bar on pytest's terminal, as `harness run` shows it: on a
    terminal only, not under -q, not on an xdist worker (its output is relayed, not a
    terminal); drawn below pytest's current line, which it leaves as it was."""
    from harness.progress import BarBelowLine, is_terminal, showing_bar

    writer = None
    if not _is_worker(config) and config.getoption("verbose") >= 0:
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        writer = getattr(reporter, "_tw", None)
    capture = config.pluginmanager.get_plugin("capturemanager")
    unshielded = capture.global_and_fixture_disabled if capture else nullcontext
    with unshielded():   # while a test runs, pytest's terminal is a capture file
        terminal = writer is not None and is_terminal(getattr(writer, "_file", None))
    if not terminal:
        yield
        return
    stream = BarBelowLine(writer._file, lambda: writer.width_of_current_line, unshielded)
    try:
        with showing_bar(label, stream):
            yield
    finally:
        stream.back_to_line()


def _describe(verdict, exc) -> str:
    from harness.errors import safe_text
    from harness.expect import fmt
    from harness.report_text import expected_text

    kind = "could not be measured" if isinstance(exc, ClaimError) else "does not hold"
    lines = [f"claim {verdict.node_id} {kind} ({verdict.file}:{verdict.line})",
             f"  expected: {expected_text(verdict.expected)}"]
    if verdict.measured is not None:
        from harness.report_text import short_measured

        lines.append(f"  measured: {short_measured(verdict.measured, 300)}")
    if verdict.margin is not None:
        lines.append(f"  margin:   {fmt(verdict.margin)}")
    lines.append(f"  {verdict.message}")
    return safe_text("\n".join(lines))   # prompt texts may hold escape codes


class SpecErrorItem(pytest.Item):
    """A spec that could not be loaded: one erroring item, so other specs still run."""

    def __init__(self, *, error: str, **kwargs):
        super().__init__(**kwargs)
        self.error = error

    def setup(self) -> None:
        raise ClaimError(self.error)

    def runtest(self) -> None:  # pragma: no cover - setup always raises
        pass

    def repr_failure(self, excinfo, style=None):
        return f"spec error: {self.error}"

    def reportinfo(self):
        return self.path, 0, f"spec error in {self.path.name}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Setup errors of claims (unmeasurable claims, spec errors) read as messages too."""
    report = yield
    if call.excinfo is not None and call.when == "setup" and \
            isinstance(call.excinfo.value, ClaimError) and hasattr(item, "repr_failure"):
        report.longrepr = item.repr_failure(call.excinfo)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_report_teststatus(report, config):
    """A claim's status word under -v carries its seconds: `PASSED (1.23 s)`, as
    `harness run` prints each claim as it finishes."""
    result = yield
    seconds = dict(getattr(report, "user_properties", ())).get("seconds")
    if seconds is None or not result or not result[2]:
        return result
    category, letter, word = result
    if isinstance(word, tuple):
        return category, letter, (f"{word[0]} ({seconds:.2f} s)", word[1])
    return category, letter, f"{word} ({seconds:.2f} s)"


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    verdicts = config.stash.get(VERDICTS_KEY, [])
    spec_errors = config.stash.get(SPEC_ERRORS_KEY, [])
    if not verdicts and not spec_errors:
        return
    from harness.report import table

    terminalreporter.write_sep("=", "interp-harness claims")
    terminalreporter.write_line(table(verdicts, [e["error"] for e in spec_errors]))


class XdistHooks:
    """With pytest-xdist, workers measure and the controller reports: verdicts travel back
    through `workeroutput`."""

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node, error) -> None:
        from harness.claims import Verdict

        data = json.loads(getattr(node, "workeroutput", {}).get("harness", "{}") or "{}")
        config = node.config
        config.stash[VERDICTS_KEY] += [Verdict(**v) for v in data.get("verdicts", [])]
        errors = config.stash[SPEC_ERRORS_KEY]
        errors += [e for e in data.get("spec_errors", []) if e not in errors]


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def pytest_sessionfinish(session: pytest.Session, exitstatus) -> None:
    config = session.config
    verdicts = config.stash.get(VERDICTS_KEY, [])
    if _is_worker(config):
        from dataclasses import asdict

        config.workeroutput["harness"] = json.dumps(
            {"verdicts": [asdict(v) for v in verdicts],
             "spec_errors": config.stash.get(SPEC_ERRORS_KEY, [])}, default=str)
        return
    verdicts.sort(key=lambda v: (v.file, v.line or 0))
    if exitstatus == pytest.ExitCode.INTERRUPTED:
        if verdicts:  # a partial run must not replace the last full report or baseline
            print(f"\ninterp-harness: interrupted after {len(verdicts)} claims; no report or "
                  "baseline was written, earlier ones are unchanged")
        return
    spec_errors = config.stash.get(SPEC_ERRORS_KEY, [])
    if verdicts or spec_errors:   # a spec error is in every report: it exits 2, merged too
        _write_outputs(config, verdicts, spec_errors)
    if spec_errors and exitstatus in (0, 1):
        session.exitstatus = 2  # the harness contract: a spec error exits 2


def _write_outputs(config: pytest.Config, verdicts, spec_errors: list[dict]) -> None:
    from harness.finish import Outputs, finish
    from harness.runner import SpecResult

    by_file: dict[str, SpecResult] = {}
    for v in verdicts:
        by_file.setdefault(v.file, SpecResult(v.file)).verdicts.append(v)
    for e in spec_errors:
        by_file.setdefault(e["file"], SpecResult(e["file"])).error = e["error"]
    results = [by_file[f] for f in sorted(by_file)]
    outputs = Outputs.from_args(lambda name: config.getoption(f"harness_{name}"))
    session = _session(config)
    data, _ = finish(results, outputs, _worker_device(config), session,
                     session.timing_report())
