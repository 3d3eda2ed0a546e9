"""Half precision and device maps: the same claims, numbers within bfloat16's precision."""

from __future__ import annotations

import textwrap

import pytest

from harness.errors import SpecError
from harness.runner import run_spec_file
from harness.session import Session
from harness.spec import load_spec
from harness.testing import build_tiny_checkpoint


def _spec(tmp_path, model_dir, extra: str, name: str):
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""\
        spec: {name}
        models:
          a: {{path: "{model_dir}"{extra}}}
        prompts:
          - text: "This movie was really"
            corrupt: "This film was really"
            answer: " bad"
            foil: " good"
        claims:
          - {{id: ld, measure: logit_diff, model: a, expect: {{">": -1000}}}}
          - {{id: sweep, measure: patch_sweep, from: {{model: a, input: clean}},
              into: {{model: a, input: corrupt}}, site: z, over: [layer, head],
              metric: logit_diff, expect: {{max: {{">": -1000}}}}}}
          - {{id: dla, measure: dla, model: a, expect: {{sum: {{">": -1000}}}}}}
        """))
    return path


def test_bfloat16_with_a_device_map_matches_float32(tmp_path):
    model_dir = build_tiny_checkpoint("llama-gqa", tmp_path / "m")
    session = Session(verbose=False)
    full = run_spec_file(_spec(tmp_path, model_dir, "", "full"), session)
    half = run_spec_file(_spec(tmp_path, model_dir, ", dtype: bfloat16, device_map: [cpu]",
                               "half"), session)
    assert not full.error and not half.error
    for a, b in zip(full.verdicts, half.verdicts):
        assert (a.status, b.status) == ("passed", "passed"), (a.message, b.message)
        values = lambda m: m["values"] if isinstance(m, dict) else [m]  # noqa: E731
        flat = lambda v: [x for row in v for x in (row if isinstance(row, list) else [row])]  # noqa: E731,E501
        for x, y in zip(flat(values(a.measured)), flat(values(b.measured))):
            assert abs(x - y) <= 0.05 * max(1.0, abs(x)), (a.claim_id, x, y)
    dtypes = {m["dtype"] for m in session.loaded_models()}
    assert dtypes == {"float32", "bfloat16"}
    engine = session.engine
    sizes = sorted(f.trace_nbytes(1, 8) for _, f in engine._forwards.values())
    assert sizes[1] == 2 * sizes[0]  # the memory budget counts bytes of the model's dtype


def test_device_and_device_map_together_is_a_spec_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(textwrap.dedent("""\
        models:
          a: {path: ".", device: cpu, device_map: auto}
        prompts: [{text: "x", answer: " a", foil: " b"}]
        claims: [{id: c, measure: logit_diff, model: a, expect: {">": 0}}]
        """))
    with pytest.raises(SpecError, match="either `device`"):
        load_spec(path)
