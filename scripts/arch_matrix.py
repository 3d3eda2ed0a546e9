"""Print the architecture x claim-kind table: every claim kind on a tiny checkpoint of every
family, with its status and the path that measured it (the table of issue 10's report).

    .venv/bin/python scripts/arch_matrix.py [ARCH ...]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tabulate import tabulate  # noqa: E402
from test_architectures import claim_matrix  # noqa: E402

from harness.testing import TINY_ARCHITECTURES  # noqa: E402


def main(archs: list[str]) -> int:
    columns, bad = {}, 0
    for arch in archs:
        with tempfile.TemporaryDirectory() as tmp:
            matrix = claim_matrix(arch, Path(tmp))
        cells = {}
        for cid, (status, path, message) in matrix.items():
            bad += status != "passed"
            short = {"gpt2-fast": "fast", "general": "gen"}.get(path, path)
            cells[cid] = "pass" if status == "passed" else status
            cells[cid] += f" {short}" if short else ""
            if status != "passed":
                print(f"{arch} {cid}: {message}", file=sys.stderr)
        columns[arch] = cells
    claims = list(next(iter(columns.values())))
    rows = [[cid, *(columns[a][cid] for a in archs)] for cid in claims]
    print(tabulate(rows, headers=["claim", *archs], tablefmt="github"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or list(TINY_ARCHITECTURES)))
