"""The notebook API: check claims against models already in memory, look at the result as a
table with figures or a DataFrame, and freeze it into a spec.

    result = harness.check("specs/toy_negative_reviews.yaml", models={"rlhf": bridge})
    result                       # renders the report (summary, table, figures) in Jupyter
    result.to_pandas()           # one row per claim; per_prompt=True: one per claim and prompt
    result.to_spec("specs/found.yaml", tolerance=0.05)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from harness.claims import Verdict
from harness.errors import HarnessError, SpecError
from harness.spec import Spec

BAD = ("failed", "error")


class ClaimsFailed(AssertionError):
    """Raised by `CheckResult.raise_for_failures` (an AssertionError, so test runners and
    scripts treat it as a failed check)."""


def claim(id: str, measure: str, expect: dict, **fields) -> dict:
    """A claim built in Python with the YAML fields (`from_=` for `from:`), validated now."""
    from pydantic import TypeAdapter, ValidationError

    from harness.spec import Claim

    data = {"id": id, "measure": measure, "expect": expect}
    data.update({("from" if k == "from_" else k): v for k, v in fields.items()})
    try:
        TypeAdapter(Claim).validate_python(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"][1:]) or "claim"
        raise SpecError(f"claim '{id}': {where}: {first['msg']}", path=where) from None
    return data


def spec_data(spec) -> tuple[dict, str, str]:
    """A spec path, YAML string or dict -> (YAML data, file name, spec name)."""
    from harness.yamlsource import read_yaml, read_yaml_text

    if isinstance(spec, dict):
        return json.loads(json.dumps(spec)), "<dict>", spec.get("spec", "notebook")
    if isinstance(spec, Path) or (isinstance(spec, str) and "\n" not in spec and (
            spec.endswith((".yaml", ".yml")) or Path(spec).exists())):
        path = Path(spec)
        data = read_yaml(path).data
        return data, str(path), (data.get("spec") if isinstance(data, dict) else None) \
            or path.stem
    if isinstance(spec, str):
        data = read_yaml_text(spec).data
        return data, "<string>", (data.get("spec") if isinstance(data, dict) else None) \
            or "notebook"
    raise HarnessError(f"spec: expected a path, a YAML string or a dict, got "
                       f"{type(spec).__name__}")


def check(spec, models: dict | None = None, claims: list[dict] | None = None, *,
          device: str | None = None, session=None, verbose: bool = False) -> CheckResult:
    """Evaluate a spec's claims (or `claims`, with the spec's models and prompts) on models
    already in memory where given (keyed by the spec's model names), loading the rest once.
    Pass `session=` (result.session) to reuse what an earlier call loaded."""
    from harness.runner import check_loaded, run_spec
    from harness.session import Session
    from harness.spec import load_spec, load_spec_text

    data, file, name = spec_data(spec)
    if claims is not None:
        data = dict(data, claims=list(claims))
    if file.endswith((".yaml", ".yml")) and claims is None:
        loaded = load_spec(file)
    else:
        import yaml

        loaded = load_spec_text(yaml.safe_dump(data, sort_keys=False), name, file)
    session = session or Session(device=device, verbose=verbose)
    for model_name, model in (models or {}).items():
        session.provide(loaded, model_name, model)
    check_loaded(loaded, session)
    result = run_spec(loaded, session)
    return CheckResult(loaded, data, result.verdicts, session)


@dataclass
class CheckResult:
    """What `check` found: verdicts, the JSON report they make, and views of it."""

    spec: Spec
    data: dict                        # the spec as YAML data (what `to_spec` rewrites)
    verdicts: list[Verdict]
    session: object = None
    report: dict = field(init=False)

    def __post_init__(self):
        from harness import report
        from harness.runner import SpecResult

        self.report = json.loads(json.dumps(
            report.json_report([SpecResult(self.spec.file, self.spec, None, self.verdicts)],
                               session=self.session), default=report._default))

    @property
    def claims(self) -> list[dict]:
        return self.report["specs"][0]["claims"]

    @property
    def failed(self) -> list[Verdict]:
        """The claims that failed or could not be measured."""
        return [v for v in self.verdicts if v.status in BAD]

    @property
    def ok(self) -> bool:
        return not self.failed

    def raise_for_failures(self) -> CheckResult:
        """For scripts: raise ClaimsFailed naming each failing claim, else return self."""
        from harness.report import failure_details

        if self.failed:
            raise ClaimsFailed(f"{len(self.failed)} of {len(self.verdicts)} claims failed:\n"
                               + failure_details(self.failed))
        return self

    def to_pandas(self, per_prompt: bool = False):
        """One row per claim; per_prompt=True: one row per claim and prompt, for the claims
        measured per prompt. Built from the JSON report, so the numbers are the report's."""
        from harness.report import dataframe

        return dataframe(self.report, per_prompt)

    def to_spec(self, path, tolerance: float = 0.05) -> Path:
        """Write a spec whose expectations are these measured values (see harness.freeze)."""
        from harness.freeze import write_frozen

        origin = f"harness.check of {self.spec.file}"
        return write_frozen(self.data, self.spec.directory, self.claims, Path(path), tolerance,
                            origin, self.report["environment"])

    def _repr_html_(self) -> str:
        """The HTML report; plotly.js only in the first one this kernel shows (see
        `init_notebook`), so each later result weighs what its data and figures weigh."""
        from harness.report_html import html_fragment

        global _plotly_shown
        page = html_fragment(self.report, include_plotlyjs=not _plotly_shown
                             or _outputs_in_own_frames())
        _plotly_shown = True
        return page

    def __repr__(self) -> str:
        from harness import report

        return report.table(self.verdicts)


# Whether this kernel has shown plotly.js in an output yet (as plotly's own notebook renderer
# tracks it): the library is embedded once, offline, and every later figure uses that copy.
_plotly_shown = False


def _outputs_in_own_frames() -> bool:
    """Google Colab shows each output in its own frame, where an earlier output's library is
    not loaded (plotly's renderers single it out too): there every result carries its copy."""
    import sys

    return "google.colab" in sys.modules


class NotebookInit:
    """`harness.init_notebook()` shown in a cell: plotly.js, once, for every result after it."""

    def _repr_html_(self) -> str:
        from harness.report_html import plotly_js_html

        global _plotly_shown
        _plotly_shown = True
        return plotly_js_html()


def init_notebook() -> NotebookInit:
    """Show this at the top of a notebook to carry plotly.js in that cell's output (e.g. after
    clearing the output that carried it); results shown after it leave the library out."""
    return NotebookInit()
