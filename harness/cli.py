"""The `harness` command: run, validate and train specs. A thin front end over runner."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness.claim_filter import STATE_FILE
from harness.errors import HarnessError, SpecError, safe_text
from harness.finish import OPTIONS, add_options, positive_int  # noqa: F401  (re-exported)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        _forget_caught_interrupt()
        print("interrupted; nothing was written", file=sys.stderr)
        return INTERRUPTED
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


INTERRUPTED = 130   # the shell's code for a run stopped by Ctrl-C (128 + SIGINT)


def _forget_caught_interrupt() -> None:
    """CPython (3.11) marks a KeyboardInterrupt as unhandled when it crosses any `exec` of a
    string, caught later or not; dataclasses build their methods that way, so a Ctrl-C during
    an import of transformers or torch made the process kill itself with SIGINT at exit
    instead of returning 130. A successful `exec` of a string clears the mark."""
    exec("")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harness", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="evaluate every claim of the given specs")
    run.add_argument("paths", nargs="+", metavar="SPEC_OR_DIR")
    add_options(run.add_argument)
    run.add_argument("-k", dest="keyword", metavar="EXPR",
                     help="only claims matching EXPR, as pytest -k: substrings of "
                          "'spec::claim', the file's stem or the measure, with and/or/not")
    run.add_argument("--lf", "--last-failed", dest="last_failed", action="store_true",
                     help="only the claims that failed or errored in the previous run "
                          f"(remembered in {STATE_FILE} beside the specs); all when none did")
    run.add_argument("--limit", type=positive_int, metavar="N",
                     help="measure each claim on its first N prompts only: a quick look; the "
                          "reports say LIMITED and a passing run exits 3, not 0")
    run.add_argument("-q", "--quiet", action="store_true",
                     help="no progress: no line per claim, no bars, no loading messages")
    run.add_argument("-v", "--verbose", action="store_true",
                     help="also the libraries' own progress bars (weight loading; "
                          "HARNESS_LIBRARY_PROGRESS=1 does the same)")
    run.set_defaults(func=_run)
    merge = sub.add_parser("merge", help="join the JSON reports of a sharded run (--shard)")
    merge.add_argument("reports", nargs="+", metavar="REPORT_JSON")
    for name, kwargs in OPTIONS:
        if name.startswith("report-"):
            merge.add_argument(f"--{name}", **kwargs)
    merge.add_argument("--junitxml", metavar="FILE", help="write a JUnit XML report")
    merge.set_defaults(func=_merge)
    show = sub.add_parser("show", help="print one claim's whole measurement: grids as "
                                       "labelled tables, per-prompt values, samples and seeds")
    show.add_argument("target", metavar="SPEC::CLAIM")
    show.add_argument("--device", help="cpu, cuda, ... (default: CUDA when available)")
    show.add_argument("--limit", type=positive_int, metavar="N",
                      help="measure on the first N prompts only")
    show.set_defaults(func=_show)
    validate = sub.add_parser("validate", help="check specs without loading model weights")
    validate.add_argument("paths", nargs="+", metavar="SPEC_OR_DIR")
    validate.add_argument("--allow-remote-code", action="store_true",
                          help="accept specs that set trust_remote_code (validate itself "
                               "never runs model code)")
    validate.set_defaults(func=_validate)
    train = sub.add_parser("train", help="build the models a spec trains or takes from the zoo")
    train.add_argument("spec", type=Path)
    train.add_argument("--model", action="append", help="only this model (repeatable)")
    train.add_argument("--seed", type=int, default=0, help="seed of the zoo world (default 0)")
    train.set_defaults(func=_train)
    diff = sub.add_parser("diff", help="compare two JSON reports (e.g. before/after retraining)")
    diff.add_argument("old", type=Path)
    diff.add_argument("new", type=Path)
    diff.add_argument("--markdown", action="store_true", help="print a Markdown table")
    diff.add_argument("--changed", action="store_true", help="only claims that changed")
    diff.set_defaults(func=_diff)
    freeze = sub.add_parser("freeze", help="write a spec whose expectations are a report's "
                                           "measured values (a regression test of a finding)")
    freeze.add_argument("report", type=Path, metavar="REPORT.json")
    freeze.add_argument("-o", "--output", type=Path, required=True, metavar="SPEC.yaml",
                        help="the spec to write (a directory when the report has several)")
    freeze.add_argument("--tolerance", type=float, default=0.05,
                        help="absolute tolerance of frozen numbers (default 0.05)")
    freeze.set_defaults(func=_freeze)
    return parser


def _freeze(args) -> int:
    from harness.freeze import freeze_report

    for path in freeze_report(args.report, args.output, args.tolerance):
        print(f"wrote {path}")
    return 0


def _diff(args) -> int:
    from harness.drift import diff_table, load_report

    print(diff_table(load_report(args.old), load_report(args.new), args.markdown, args.changed))
    return 0


def _spec_paths(paths: list[str]) -> list[Path]:
    from harness.spec import find_specs

    found = find_specs(paths)
    missing = [p for p in found if not p.exists()]
    if missing:
        raise HarnessError(f"no such spec file or directory: {missing[0]}")
    if not found:
        raise HarnessError(f"no spec files (*.yaml, *.yml) under {', '.join(paths)}")
    return found


def _run(args) -> int:
    import time

    if args.limit is not None and args.update_baselines:
        raise HarnessError("--limit measures each claim on its first N prompts only; such values "
                           "cannot be a baseline (the next full run would drift from them). Run "
                           "--update-baselines without --limit")
    start = time.perf_counter()
    from harness import report
    from harness.claim_filter import selector
    from harness.finish import Outputs, check_outputs, finish
    from harness.progress import ClaimProgress, quiet_libraries
    from harness.runner import SpecResult, exit_code_limited, run_spec_file
    from harness.session import Session

    outputs = Outputs.from_args(lambda name: getattr(args, name))
    check_outputs(outputs)
    session = Session(device=args.device, memory_budget_mb=args.memory_budget_mb,
                      verbose=not args.quiet, update_baselines=args.update_baselines,
                      allow_remote_code=args.allow_remote_code, started=start,
                      limit=args.limit, progress=ClaimProgress(quiet=args.quiet))
    session.timing["import_s"] += time.perf_counter() - start   # torch, transformers
    if not args.verbose:
        quiet_libraries()
    select = selector(args.keyword, args.last_failed)
    paths = _spec_paths(args.paths)
    shard, resolved = _shard(paths, args.shard) if args.shard else (None, {})
    results: list[SpecResult] = []
    with interrupt_flag() as interrupted:
        try:
            for path in paths:
                results.append(SpecResult(str(path)))
                indices = None if shard is None else {i for f, i in shard if f == str(path)}
                run_spec_file(path, session, results[-1], stop=lambda: interrupted,
                              select=select, indices=indices, spec=resolved.get(str(path)))
                if results[-1].error:
                    print(f"spec error: {safe_text(str(results[-1].error))}", file=sys.stderr)
                elif results[-1].spec is not None:
                    _remember(path, results[-1])
        except KeyboardInterrupt:
            _forget_caught_interrupt()
            print(_interrupted_line(results, len(paths)), file=sys.stderr)
            return INTERRUPTED
    verdicts = [v for r in results for v in r.verdicts]
    if select is not None and not verdicts and not any(r.error for r in results):
        print(f"no claim matches -k {args.keyword!r}" if args.keyword else "no claims selected",
              file=sys.stderr)
    print(report.table(verdicts, [str(r.error) for r in results if r.error], args.limit))
    details = report.failure_details(verdicts)
    if details:
        print("\n" + details)
    _, messages = finish(results, outputs, args.device, session, session.timing_report())
    for message in messages:
        print(message)
    return exit_code_limited(results, args.limit)


def _remember(path: Path, result) -> None:
    """Which claims failed, for --last-failed (a read-only specs folder only warns)."""
    from harness.claim_filter import record_run

    try:
        record_run(path, {v.claim_id: v.status for v in result.verdicts},
                   [c.id for c in result.spec.claims])
    except OSError as exc:
        print(f"warning: cannot remember failed claims beside {path}: {exc}", file=sys.stderr)


def _show(args) -> int:
    from harness import report
    from harness.claim_filter import selector
    from harness.runner import run_spec_file
    from harness.session import Session
    from harness.show import claim_text

    path, sep, claim_id = args.target.rpartition("::")
    if not sep or not path or not claim_id:
        raise HarnessError(f"show: expected SPEC::CLAIM (e.g. specs/x.yaml::my-claim), got "
                           f"{args.target!r}")
    session = Session(device=args.device, verbose=False, limit=args.limit)
    result = run_spec_file(Path(path), session, select=selector(claim_id=claim_id))
    if result.error:
        raise result.error
    if not result.verdicts:
        from harness.errors import did_you_mean

        ids = [c.id for c in result.spec.claims]
        raise HarnessError(f"{path}: no claim '{claim_id}'" + did_you_mean(claim_id, ids))
    data = report.json_report([result], args.device, session)
    print(safe_text(claim_text(result.spec.spec, data["specs"][0]["claims"][0])))
    return 0


class interrupt_flag:
    """While active, Ctrl-C raises KeyboardInterrupt and also sets a flag that the run loop
    checks between claims, so an interrupt that a library swallows still stops the run."""

    def __enter__(self):
        import signal

        self.flag = _Flag()

        def handler(signum, frame):
            self.flag.value = True
            raise KeyboardInterrupt
        self.previous = signal.signal(signal.SIGINT, handler)
        return self.flag

    def __exit__(self, *exc) -> None:
        import signal

        signal.signal(signal.SIGINT, self.previous)


class _Flag:
    value = False

    def __bool__(self) -> bool:
        return self.value


def _interrupted_line(results, n_specs: int) -> str:
    done = [v for r in results for v in r.verdicts]
    per_spec = ", ".join(f"{Path(r.file).name}: {len(r.verdicts)}"
                         + (f"/{len(r.spec.claims)}" if r.spec else "") for r in results)
    return (f"interrupted: {len(done)} claims finished in {len(results)} of {n_specs} specs"
            + (f" ({per_spec})" if results else "")
            + "; no report or baseline was written, earlier ones are unchanged")


def _shard(paths: list[Path], text: str) -> tuple[set[tuple[str, int]], dict[str, object]]:
    """This run's part of the claims of the specs that load (spec errors show in every part),
    and those specs, read and resolved once (the run goes on with them)."""
    from harness.shard import parse_shard, plan
    from harness.spec import load_spec

    k, n = parse_shard(text)
    specs = {}
    for path in paths:
        try:
            specs[str(path)] = load_spec(path)
        except SpecError:
            pass
    return plan(list(specs.values()), n)[k - 1], specs


def _merge(args) -> int:
    """Join the JSON reports of a sharded run into one report and one exit code."""
    from harness.finish import Outputs, check_outputs, exit_code, write_outputs
    from harness.report_text import read_report
    from harness.shard import merge_reports

    outputs = Outputs(args.report_json, args.report_md, args.report_html, args.junitxml)
    check_outputs(outputs)
    reports = [read_report(path) for path in args.reports]
    data = merge_reports(reports)
    from harness.report_text import report_summary_line

    print(f"merged {len(reports)} reports: {report_summary_line(data)}")
    details = "\n".join(f"{c['status'].upper()} {s['spec']}::{c['id']}: {c.get('message', '')}"
                        for s in data["specs"] for c in s["claims"]
                        if c["status"] in ("failed", "error"))
    if details:
        print(safe_text(details))
    for path in write_outputs(data, outputs):
        print(f"wrote {path}")
    return exit_code(data)


def _validate(args) -> int:
    """Spec checks without torch or weights (see harness/validate.py)."""
    from harness.validate import validate_spec

    status = 0
    for path in _spec_paths(args.paths):
        try:
            spec = validate_spec(path, allow_remote_code=args.allow_remote_code)
            print(f"ok: {path} ({len(spec.claims)} claims, {len(spec.models)} models)")
        except SpecError as exc:
            print(f"spec error: {safe_text(str(exc))}", file=sys.stderr)
            status = 2
        except HarnessError as exc:
            print(f"spec error: {path}: {safe_text(str(exc))}", file=sys.stderr)
            status = 2
    return status


def _train(args) -> int:
    """Build the zoo world (cached) and every `train:` model; say how long each stage took
    and whether the rebuilt zoo models are bit-identical to the shipped ones."""
    from harness.session import Session
    from harness.spec import load_spec

    spec = load_spec(args.spec)
    names = args.model or [n for n, m in spec.models.items() if m.zoo or m.train]
    unknown = [n for n in names if n not in spec.models]
    if unknown:
        from harness.errors import did_you_mean

        raise HarnessError(f"unknown model '{unknown[0]}'" + did_you_mean(unknown[0],
                                                                          spec.models))
    if any(spec.models[n].zoo for n in names):
        _build_zoo(args.seed)
    session = Session()
    for name in names:
        if spec.models[name].train:
            print(f"{name}: {session.location(spec, name)}")
    return 0


def _build_zoo(seed: int) -> None:
    import json
    import time

    from harness.zoo import build_world, zoo_checkpoint

    start = time.perf_counter()
    built = build_world(seed=seed, progress=True)
    report = json.loads((next(iter(built.values())).parent / "build_report.json").read_text())
    print(f"zoo world (seed {seed}) in {next(iter(built.values())).parent} "
          f"({time.perf_counter() - start:.1f} s this call)")
    for stage, seconds in report.get("stage_seconds", {}).items():
        print(f"  {stage:<10} {seconds:8.1f} s")
    for name, path in built.items():
        same = _same_files(path, zoo_checkpoint(name))
        print(f"  {name}: {path} — "
              + ("bit-identical to the shipped model" if same else "differs from the shipped "
                 "model (other seed, versions or machine)"))


def _same_files(a: Path, b: Path) -> bool:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return files_a == files_b and all((a / f).read_bytes() == (b / f).read_bytes()
                                      for f in files_a)


if __name__ == "__main__":
    sys.exit(main())
