"""Parity of our PyTorch modules with the official implementation, on every reference case.

Runs every case under ``$SEMVOC_REFERENCE_DIR`` (default ``../shared/reference``): builds the
module from the case's config through our config mapping, loads its weights strictly, feeds
its inputs and compares every listed output (float32; max abs error <= 1e-4 x the output's
scale; integers and masks exactly). Debug outputs are compared too when we compute them.
An unknown component fails; an empty or missing fixture root fails.
"""

from __future__ import annotations

import pytest
import torch

from tests.reference import RUNNERS, compare, discover_cases, load_case, reference_root

CASES = discover_cases()
REL_TOL = 1e-4


def test_fixture_root_has_cases():
    assert CASES, (f"no reference cases under {reference_root()}; set SEMVOC_REFERENCE_DIR to a "
                   "fixture root holding <case>/{config.json, weights.safetensors, io.npz}")


@pytest.mark.parametrize("case_dir", CASES, ids=[p.name for p in CASES])
def test_pytorch_matches_reference(case_dir):
    case = load_case(case_dir)
    if case.component not in RUNNERS:
        pytest.fail(f"{case_dir.name}: unknown component {case.component!r}; semvoc knows {sorted(RUNNERS)}")
    with torch.no_grad():
        ours = RUNNERS[case.component](case)
    problems = []
    for name in case.config["outputs"]:
        if name not in ours:
            problems.append(f"{name}: not computed by semvoc")
        else:
            problems.append(compare(name, ours[name], case.io[name], REL_TOL))
    for name in case.config.get("debug_outputs", []):
        if name in ours:  # debug values locate a mismatch; same bound
            problems.append(compare(name, ours[name], case.io[name], REL_TOL))
    problems = [p for p in problems if p]
    assert not problems, f"{case_dir.name} ({case.component}):\n  " + "\n  ".join(problems)
