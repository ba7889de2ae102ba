"""Mutation checks of the kernels (``make mutate``): does the CPU tier catch a planted bug?

    python -m fastmlm.tools.mutate                  # every mutation of fastmlm/tools/mutations.py
    python -m fastmlm.tools.mutate --fast           # the CI subset (a few mutants, their killing tests only)
    python -m fastmlm.tools.mutate --fast --only NAME   # one mutation against its killing tests only
    python -m fastmlm.tools.mutate --only NAME ...  # chosen mutations;  --file PATH: those of one file
    python -m fastmlm.tools.mutate --list           # list them (and check that none is stale), run nothing
    python -m fastmlm.tools.mutate --baseline       # first run each test selection unmutated

The CPU tier (Triton interpreter, CUDA emulator) is the only check most kernel changes get
before they reach a GPU, so it has to fail on real bugs. Each :class:`~fastmlm.tools.mutations.Mutation`
is one exact textual edit (``old`` -> ``new``) standing for a bug a reviewer could miss. For
each, in turn, the tool

  1. copies the repository once into a scratch folder (the files git tracks plus untracked,
     not ignored ones, as they are in the working tree: the working tree is never written);
  2. writes the mutated file there, runs only the tests that cover it (``pytest -x``, with
     the scratch copy first on ``sys.path``: ``fastmlm``, ``fastmlm_kernels`` and ``csrc/``
     all resolve inside it), then puts the file back;
  3. reports it ``killed`` (a test failed; the first failing test is named), ``survived``
     (every test passed: the CPU tier missed the bug), ``invalid`` (the mutant does not even
     compile, or every covering test was skipped, so it shows nothing) or ``stale`` (``old``
     is not in the file exactly once: the kernel changed and the list must follow it), with
     the time taken.

The exit status is 0 only when every mutant that was run is killed and none is stale.
Mutations marked ``equivalent`` (with the reason the tests cannot tell them apart) are listed, not run.
Writes nothing outside the scratch folder except the CUDA emulator's cache for unmutated
csrc/ (a mutated csrc/ builds into the scratch folder, by its own source hash).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

from .mutations import MUTATIONS, Mutation

ROOT = Path(__file__).resolve().parents[2]
KILLED, SURVIVED, INVALID, STALE, EQUIVALENT = "killed", "survived", "invalid", "stale", "equivalent"
# Output that means the mutant failed to build, not that a test caught a wrong result.
_BUILD_FAILURES = ("building the kernel emulator failed", "CompilationError", "SyntaxError", "IndentationError")


@dataclass
class Outcome:
    """What happened to one mutation."""

    mutation: Mutation
    status: str  # KILLED, SURVIVED, INVALID, STALE or EQUIVALENT
    seconds: float = 0.0
    detail: str = ""  # the killing test, why it is stale or invalid, ...

    def line(self) -> str:
        m = self.mutation
        detail = f"  [{self.detail}]" if self.detail else ""
        return f"{self.status.upper():10s} {self.seconds:6.1f}s  {m.path}  {m.name}: {m.bug}{detail}"


# --------------------------------------------------------------------------- applying a mutation
def mutated_text(mutation: Mutation, text: str) -> str:
    """``text`` with the mutation applied; ValueError (naming the mutation) when ``old`` is not there exactly once."""
    count = text.count(mutation.old)
    if count != 1:
        where = "not found" if count == 0 else f"found {count} times (it must be unique)"
        raise ValueError(f"mutation {mutation.name!r}: its old text is {where} in {mutation.path}")
    return text.replace(mutation.old, mutation.new, 1)


def stale_reason(mutation: Mutation, root: Path = ROOT) -> Optional[str]:
    """None when the mutation applies to ``root`` as it is, else why not."""
    path = root / mutation.path
    if not path.is_file():
        return f"{mutation.path} does not exist"
    try:
        mutated_text(mutation, path.read_text())
    except ValueError as exc:
        return str(exc)
    return None


# --------------------------------------------------------------------------- the scratch copy
def _repo_files(root: Path) -> list[str]:
    """Relative paths to copy: git's tracked and untracked-not-ignored files, or a plain walk without git."""
    try:
        listed = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others",
                                 "--exclude-standard"], capture_output=True, check=True).stdout
        return sorted({p for p in listed.decode().split("\0") if p})
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", "build", "__pycache__", ".pytest_cache"}
        return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                      if p.is_file() and not skip & set(p.relative_to(root).parts))


def make_scratch(root: Path = ROOT, into: Optional[Path] = None) -> Path:
    """Copy the repository at ``root`` (working-tree versions) into a new folder; returns it.

    ``fastmlm_kernels`` is made a link to the copy's ``kernels/``, so the editable install's
    finder (which maps that name to the original checkout) is never consulted."""
    scratch = Path(tempfile.mkdtemp(prefix="fastmlm-mutate-", dir=into))
    for rel in _repo_files(root):
        src = root / rel
        if not src.is_file():  # deleted in the working tree, or a submodule
            continue
        dst = scratch / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
    (scratch / "fastmlm_kernels").symlink_to("kernels", target_is_directory=True)
    return scratch


def scratch_env(scratch: Path, mutated_path: str = "") -> dict:
    """The environment of a test run in ``scratch``: its copy first on sys.path, no bytecode
    written (a mutant and its restored original can share a size and an mtime second, and a
    stale .pyc would run the wrong one), the Triton interpreter on."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(scratch), str(scratch / "tests")])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["TRITON_INTERPRET"] = "1"
    env["FASTMLM_TRITON_AUTOTUNE"] = "0"
    if mutated_path.startswith("csrc/"):  # the mutant's emulator build stays (and dies) in the scratch copy
        env["FASTMLM_EMULATOR_CACHE"] = str(scratch / ".emulator-cache")
    return env


_WHERE = ("import fastmlm, fastmlm_kernels; from fastmlm.ops.cuda_impl import emulate; "
          "print(fastmlm.__file__); print(fastmlm_kernels.__file__); print(emulate.CSRC)")


def check_imports(scratch: Path) -> None:
    """Raise RuntimeError unless fastmlm, fastmlm_kernels and csrc/ resolve inside ``scratch``."""
    done = subprocess.run([sys.executable, "-c", _WHERE], cwd=scratch, env=scratch_env(scratch),
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"importing fastmlm in the scratch copy failed:\n{done.stderr[-2000:]}")
    outside = [p for p in done.stdout.split() if not Path(p).resolve().is_relative_to(scratch.resolve())]
    if outside:
        raise RuntimeError(f"in the scratch copy {scratch} these resolve outside it: {outside}")


# --------------------------------------------------------------------------- running
def pytest_command(files: Sequence[str], keyword: str, timeout: float) -> list[str]:
    """pytest over ``files`` (-k ``keyword`` when given), stopping at the first failure, GPU tests left out."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-rfE", "--no-header",
           "-m", "not gpu", f"--timeout={int(timeout)}", *files]
    return cmd + (["-k", keyword] if keyword else [])


def _first_failure(output: str) -> str:
    match = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.M)
    return match.group(1) if match else "a test failed"


def classify(returncode: Optional[int], output: str) -> tuple[str, str]:
    """(status, detail) of one pytest run of a mutant; ``returncode`` None means it timed out."""
    if returncode is None:
        return KILLED, "timed out"
    if returncode == 0:
        if not re.search(r"\b\d+ passed", output):  # every test skipped (no g++, no interpreter): nothing was checked
            return INVALID, "no covering test ran (all skipped)"
        return SURVIVED, ""
    if any(marker in output for marker in _BUILD_FAILURES):
        return INVALID, "does not build: " + next(m for m in _BUILD_FAILURES if m in output)
    if returncode == 1:
        return KILLED, _first_failure(output)
    # 2: interrupted / collection error, 3: internal error, 4: usage error, 5: no test collected
    return INVALID, f"pytest exit status {returncode}: {output.strip().splitlines()[-1:] or ''}"


def run_tests(cmd: Sequence[str], scratch: Path, env: dict, timeout: float) -> tuple[Optional[int], str]:
    """(pytest's exit status, its output); status None when it ran past ``timeout`` (pytest-timeout's
    own limit, plus a minute for collection, as a backstop)."""
    try:
        done = subprocess.run(cmd, cwd=scratch, env=env, capture_output=True, text=True, timeout=timeout + 60)
    except subprocess.TimeoutExpired:
        return None, ""
    return done.returncode, done.stdout + done.stderr


def run_mutation(mutation: Mutation, scratch: Path, fast: bool = False, timeout: float = 600) -> Outcome:
    """Apply one mutation to ``scratch``, run its tests, put the file back; returns the outcome."""
    if mutation.equivalent:
        return Outcome(mutation, EQUIVALENT, detail=mutation.equivalent)
    why = stale_reason(mutation, scratch)
    if why:
        return Outcome(mutation, STALE, detail=why)
    path = scratch / mutation.path
    original = path.read_text()
    start = time.perf_counter()
    try:
        path.write_text(mutated_text(mutation, original))
        returncode, output = run_tests(pytest_command(*mutation.covering(fast), timeout), scratch,
                                       scratch_env(scratch, mutation.path), timeout)
    finally:
        path.write_text(original)
    status, detail = classify(returncode, output)
    return Outcome(mutation, status, time.perf_counter() - start, detail)


def run_baseline(mutations: Iterable[Mutation], scratch: Path, fast: bool, timeout: float) -> list[str]:
    """Run each distinct test selection unmutated; returns the failing ones (a mutant of a red suite proves nothing)."""
    failing = []
    for files, keyword in dict.fromkeys(m.covering(fast) for m in mutations if not m.equivalent):
        start = time.perf_counter()
        code, output = run_tests(pytest_command(files, keyword, timeout), scratch, scratch_env(scratch), timeout)
        what = f"{' '.join(files)}" + (f" -k {keyword!r}" if keyword else "")
        print(f"baseline {'ok' if code == 0 else 'FAILED':6s} {time.perf_counter() - start:6.1f}s  {what}", flush=True)
        if code != 0:
            failing.append(f"{what}: {_first_failure(output) if code is not None else 'timed out'}")
    return failing


def summary(outcomes: Sequence[Outcome]) -> str:
    """The score line: killed / run, then the counts of every other status."""
    counts = {s: sum(o.status == s for o in outcomes) for s in (KILLED, SURVIVED, INVALID, STALE, EQUIVALENT)}
    run = counts[KILLED] + counts[SURVIVED]
    score = f"{100 * counts[KILLED] / run:.0f}%" if run else "n/a"
    rest = ", ".join(f"{n} {s}" for s, n in counts.items() if n and s not in (KILLED,))
    return f"mutation score {counts[KILLED]}/{run} killed ({score})" + (f"; {rest}" if rest else "")


def select(names: Sequence[str] = (), file: str = "", fast: bool = False,
           mutations: Sequence[Mutation] = MUTATIONS) -> list[Mutation]:
    """The mutations to run; ValueError naming an unknown name or a file without mutations."""
    chosen = list(mutations)
    if names:
        known = {m.name: m for m in mutations}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"--only: unknown mutation(s) {unknown}; --list shows them")
        chosen = [known[n] for n in names]
    if file:
        chosen = [m for m in chosen if m.path == file]
        if not chosen:
            raise ValueError(f"--file: no mutation of {file!r}; files with mutations: "
                             f"{sorted({m.path for m in mutations})}")
    if fast and not (names or file):  # --fast alone: the CI subset
        chosen = [m for m in chosen if m.fast]
    return chosen


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastmlm.tools.mutate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true",
                        help="only the tests that kill each mutant (its select); alone: the CI subset")
    parser.add_argument("--only", nargs="+", default=(), metavar="NAME", help="run these mutations")
    parser.add_argument("--file", default="", metavar="PATH", help="run the mutations of this file")
    parser.add_argument("--list", action="store_true", help="list the mutations and check for stale ones")
    parser.add_argument("--baseline", action="store_true", help="first run every test selection unmutated")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per mutant (default 600)")
    parser.add_argument("--json", type=Path, help="also write the outcomes to this file")
    parser.add_argument("--keep-scratch", action="store_true", help="leave the scratch copy (its path is printed)")
    args = parser.parse_args(argv)
    try:
        chosen = select(args.only, args.file, args.fast)
    except ValueError as exc:
        parser.error(str(exc))

    if args.list:
        stale = 0
        for m in chosen:
            why = stale_reason(m)
            stale += why is not None
            flag = "STALE " if why else ("equiv " if m.equivalent else ("fast  " if m.fast else "      "))
            print(f"{flag} {m.path}  {m.name}: {m.bug}" + (f"  [{why}]" if why else ""))
        print(f"{len(chosen)} mutations, {stale} stale")
        return 1 if stale else 0

    scratch = make_scratch()
    print(f"scratch copy: {scratch}", flush=True)
    outcomes: list[Outcome] = []
    try:
        try:
            check_imports(scratch)
        except RuntimeError as exc:
            print(f"mutate: {exc}", file=sys.stderr)
            return 1
        if args.baseline:
            failing = run_baseline(chosen, scratch, args.fast, args.timeout)
            if failing:
                print("the unmutated tests fail, so no mutant can be judged:\n  " + "\n  ".join(failing))
                return 1
        for m in chosen:
            outcome = run_mutation(m, scratch, args.fast, args.timeout)
            outcomes.append(outcome)
            print(outcome.line(), flush=True)
    finally:
        if args.keep_scratch:
            print(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    print(summary(outcomes))
    if args.json:
        args.json.write_text(json.dumps([dict(name=o.mutation.name, path=o.mutation.path, status=o.status,
                                              seconds=round(o.seconds, 1), detail=o.detail) for o in outcomes],
                                        indent=1))
    bad = [o for o in outcomes if o.status in (SURVIVED, STALE, INVALID)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
