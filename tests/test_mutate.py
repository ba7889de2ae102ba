"""The mutation tool (fastmlm/tools/mutate.py) and its list (fastmlm/tools/mutations.py).

Fast checks of the machinery (applying, stale entries, classifying, restoring the file, the
scratch copy resolving its own imports), that every entry of the list still applies to the
code as it is now, and (marked slow) the CI subset: a few mutants that the CPU tier must kill.
"""
from pathlib import Path

import pytest

from fastmlm.ops.cuda_impl import emulate
from fastmlm.tools import mutate
from fastmlm.tools.mutations import COVERING, MUTATIONS, Mutation

ROOT = Path(__file__).resolve().parents[1]


def _mutation(**overrides) -> Mutation:
    fields = dict(name="m", path="kernels/_flash.py", old="alpha", new="beta", bug="a bug")
    return Mutation(**{**fields, **overrides})


# --------------------------------------------------------------------------- the list
def test_every_mutation_applies_to_the_code_as_it_is():
    """No stale entry: each old text occurs exactly once in its file (else the kernel moved on
    and the entry must follow it)."""
    stale = [why for m in MUTATIONS if (why := mutate.stale_reason(m, ROOT))]
    assert not stale, "stale mutations (update fastmlm/tools/mutations.py):\n" + "\n".join(stale)


def test_the_list_is_well_formed():
    names = [m.name for m in MUTATIONS]
    assert len(names) == len(set(names)), "mutation names are unique"
    for m in MUTATIONS:
        assert m.path in COVERING, f"{m.name}: no covering tests for {m.path}"
        assert m.old != m.new and m.bug, m.name
        assert not (m.fast and m.equivalent), f"{m.name}: an equivalent mutant cannot be in the CI subset"
        assert not m.fast or m.select, f"{m.name}: a CI-subset mutant names the tests that kill it (select)"
        for test_file in m.covering()[0]:
            assert (ROOT / test_file).is_file(), f"{m.name}: covering test file {test_file} is missing"
    assert any(m.fast for m in MUTATIONS)


def test_select_by_name_file_and_subset():
    assert [m.name for m in mutate.select(["flash-no-minf-guard"])] == ["flash-no-minf-guard"]
    assert {m.path for m in mutate.select(file="csrc/attention.cuh")} == {"csrc/attention.cuh"}
    assert all(m.fast for m in mutate.select(fast=True))
    assert [m.name for m in mutate.select(["attn-kv-strides-of-q"], fast=True)] == ["attn-kv-strides-of-q"]
    with pytest.raises(ValueError, match=r"--only: unknown mutation\(s\) \['nope'\]"):
        mutate.select(["nope"])
    with pytest.raises(ValueError, match="--file: no mutation of 'README.md'"):
        mutate.select(file="README.md")


# --------------------------------------------------------------------------- applying
def test_mutated_text_replaces_exactly_one_occurrence():
    assert mutate.mutated_text(_mutation(), "x = alpha + 1") == "x = beta + 1"
    with pytest.raises(ValueError, match="mutation 'm': its old text is not found in kernels/_flash.py"):
        mutate.mutated_text(_mutation(), "x = gamma")
    with pytest.raises(ValueError, match="found 2 times"):
        mutate.mutated_text(_mutation(), "alpha alpha")


def test_stale_and_missing_files_are_reported(tmp_path):
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "_flash.py").write_text("x = gamma\n")
    assert "not found" in mutate.stale_reason(_mutation(), tmp_path)
    assert "does not exist" in mutate.stale_reason(_mutation(path="kernels/gone.py"), tmp_path)
    outcome = mutate.run_mutation(_mutation(), tmp_path)
    assert outcome.status == mutate.STALE and "not found" in outcome.detail
    assert (tmp_path / "kernels" / "_flash.py").read_text() == "x = gamma\n"


def test_list_fails_on_a_stale_entry(monkeypatch, capsys):
    monkeypatch.setattr(mutate, "select", lambda *a, **k: [_mutation(old="no such text anywhere")])
    assert mutate.main(["--list"]) == 1
    assert "STALE" in capsys.readouterr().out


def test_run_mutation_tests_the_mutant_then_restores_the_file(tmp_path, monkeypatch):
    target = tmp_path / "kernels" / "_flash.py"
    target.parent.mkdir()
    target.write_text("y = alpha\n")
    seen = {}

    def fake_run(cmd, scratch, env, timeout):
        seen["text"], seen["cmd"], seen["env"] = target.read_text(), cmd, env
        return 1, "FAILED tests/test_attention_triton.py::test_x - AssertionError\n"

    monkeypatch.setattr(mutate, "run_tests", fake_run)
    outcome = mutate.run_mutation(_mutation(), tmp_path)
    assert seen["text"] == "y = beta\n", "the tests ran against the mutant"
    assert target.read_text() == "y = alpha\n", "the file is put back"
    assert outcome.status == mutate.KILLED and outcome.detail == "tests/test_attention_triton.py::test_x"
    assert "-x" in seen["cmd"] and "tests/test_attention_triton.py" in seen["cmd"]
    assert seen["env"]["PYTHONDONTWRITEBYTECODE"] == "1" and seen["env"]["TRITON_INTERPRET"] == "1"

    def crashing_run(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(mutate, "run_tests", crashing_run)
    with pytest.raises(KeyboardInterrupt):
        mutate.run_mutation(_mutation(), tmp_path)
    assert target.read_text() == "y = alpha\n", "put back even when the run is interrupted"


def test_equivalent_mutants_are_listed_not_run(tmp_path):
    outcome = mutate.run_mutation(_mutation(equivalent="computes the same"), tmp_path)
    assert outcome.status == mutate.EQUIVALENT and outcome.detail == "computes the same"


def test_csrc_mutants_build_the_emulator_inside_the_scratch_copy(tmp_path):
    assert mutate.scratch_env(tmp_path, "csrc/attention.cuh")["FASTMLM_EMULATOR_CACHE"].startswith(str(tmp_path))
    assert mutate.scratch_env(tmp_path, "kernels/_flash.py").get("FASTMLM_EMULATOR_CACHE") != str(
        tmp_path / ".emulator-cache")


@pytest.mark.parametrize("code,output,status,detail", [
    (0, "5 passed", mutate.SURVIVED, ""),
    (0, "3 skipped", mutate.INVALID, "no covering test ran"),
    (1, "FAILED tests/a.py::test_b[x] - assert 1 == 2", mutate.KILLED, "tests/a.py::test_b[x]"),
    (1, "ERROR tests/a.py::test_c - RuntimeError", mutate.KILLED, "tests/a.py::test_c"),
    (None, "", mutate.KILLED, "timed out"),
    (1, "RuntimeError: building the kernel emulator failed:\n...", mutate.INVALID, "does not build"),
    (1, "triton.compiler.errors.CompilationError: at 3:4", mutate.INVALID, "does not build"),
    (5, "no tests ran", mutate.INVALID, "pytest exit status 5"),
])
def test_classify(code, output, status, detail):
    got_status, got_detail = mutate.classify(code, output)
    assert got_status == status and got_detail.startswith(detail)


def test_summary_gives_the_score():
    m = _mutation()
    outcomes = [mutate.Outcome(m, mutate.KILLED), mutate.Outcome(m, mutate.KILLED), mutate.Outcome(m, mutate.SURVIVED),
                mutate.Outcome(m, mutate.EQUIVALENT)]
    assert mutate.summary(outcomes) == "mutation score 2/3 killed (67%); 1 survived, 1 equivalent"
    assert mutate.summary([]) == "mutation score 0/0 killed (n/a)"


# --------------------------------------------------------------------------- the scratch copy
def test_scratch_copy_without_git_and_its_kernels_link(tmp_path):
    repo = tmp_path / "repo"
    for rel in ("kernels/__init__.py", "fastmlm/x.py", ".venv/skip.py", "fastmlm/__pycache__/x.pyc"):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(rel)
    scratch = mutate.make_scratch(repo, into=tmp_path)
    assert (scratch / "fastmlm" / "x.py").read_text() == "fastmlm/x.py"
    assert not (scratch / ".venv").exists() and not (scratch / "fastmlm" / "__pycache__").exists()
    assert (scratch / "fastmlm_kernels" / "__init__.py").read_text() == "kernels/__init__.py"


@pytest.mark.slow
def test_ci_subset_is_killed(capsys):
    """The CI subset of ``make mutate``: each mutant is killed by the CPU tier (about a minute or
    two: one Triton run, one CUDA emulator build). Checks on the way that fastmlm, fastmlm_kernels
    and csrc/ resolve inside the scratch copy, not in this checkout."""
    names = [m.name for m in mutate.select(fast=True)
             if not (m.path.startswith("csrc/") and emulate.unavailable())]  # CUDA mutants need the emulator
    assert mutate.main(["--fast", "--only", *names]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "SURVIVED" not in out and "mutation score" in out
