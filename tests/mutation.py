"""Mutation testing of the decision code with mutmut 3 (``make mutation``; run by hand, never in CI).

Usage (from the repository root; ``make mutation`` runs it under ``nice -n 19``)::

    .venv/bin/python tests/mutation.py                                  # every module in MODULES
    .venv/bin/python tests/mutation.py search/sampling.py,budget/budget.py
    .venv/bin/python tests/mutation.py --recheck search/sampling.py     # re-test the survivors (after new tests)
    .venv/bin/python tests/mutation.py --report                         # the table of the last results only
    .venv/bin/python tests/mutation.py --show search/sampling.py        # the diff of each survivor

Why a driver: mutmut names a mutant after its file's path relative to the folder it runs in and matches that name
against the module the tests import; the repository root *is* the package ``branchwise``, so run from the root
``search/sampling.py`` would be ``search.sampling`` while the tests import ``branchwise.search.sampling``. Each
module is therefore mutated in a stage folder ``mutants/<module>/`` (git-ignored) that holds ``branchwise/`` (links
to the package's files and subpackages), ``tests`` (a link) and a ``pyproject.toml`` (the repository's, plus the
``[tool.mutmut]`` table written here). mutmut copies the whole package into ``mutants/<module>/mutants/``, which it
puts first on ``sys.path``, so the tests import the mutated copy. Only the module's file is mutated, and only the
unit tests of that module run (selection in MODULES; ``-m "not engine and not server"``, ``-x``, no cache), one
worker at a time. mutmut keeps its results in the stage folder: a rerun tests only the mutants of changed functions
(all of them when the module's test selection changed, and all the chosen ones of a module in FUNCTIONS).
To look at one survivor: ``cd mutants/search.sampling && ../../.venv/bin/mutmut show <name>``.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "mutants"
MUTMUT = Path(sys.executable).with_name("mutmut")

# The module to mutate -> the unit test files that test it (the fast selection run against each mutant).
MODULES: dict[str, list[str]] = {
    "search/sampling.py": [
        "test_strategies_basic.py",
        "test_branch_failures.py",
        "test_mutation_sampling.py",
        "test_mutation_search.py",
    ],
    "search/self_consistency.py": [
        "test_strategies_basic.py",
        "test_branch_failures.py",
        "test_mutation_self_consistency.py",
    ],
    "search/deepconf.py": ["test_deepconf.py", "test_mutation_deepconf.py", "test_branch_failures.py"],
    "search/prune.py": ["test_prune_adaptive.py", "test_mutation_prune.py", "test_branch_failures.py"],
    "search/adaptive.py": ["test_prune_adaptive.py", "test_mutation_adaptive.py", "test_branch_failures.py"],
    "search/consensus.py": ["test_consensus.py", "test_mutation_consensus.py"],
    "budget/budget.py": ["test_budget.py", "test_mutation_budget.py"],
    "planners/plan.py": ["test_plan.py", "test_mutation_plan.py", "test_llmcompiler_parser.py"],
    "executors/executor.py": ["test_executor.py", "test_mutation_executor.py"],
    "verifiers/extraction.py": ["test_extraction.py", "test_mutation_extraction.py"],
    "verifiers/confidence.py": ["test_confidence.py", "test_mutation_confidence.py"],
    "verifiers/numeric.py": ["test_grading.py", "test_extraction.py", "test_mutation_numeric.py"],
    "evals/metrics.py": ["test_metrics.py", "test_mutation_metrics.py"],
    "evals/runner.py": ["test_runner.py", "test_mutation_runner.py"],
}

# Modules of which only part is decision code: mutmut's names of the functions to mutate (the rest is not run).
FUNCTIONS: dict[str, list[str]] = {
    "planners/plan.py": [  # the reference parsing, resolution and checking
        "x_find_references",
        "x__collect",
        "x__ref",
        "x__lookup",
        "x__as_text",
        "x_resolve_value",
        "x__output_of",
        "xǁPlanNodeǁreferences",
        "xǁPlanNodeǁdependencies",
        "xǁPlanNodeǁresolved",
        "x_check_node",
    ],
    "evals/runner.py": [  # everything but the progress display (_Tally, LineProgress, RichProgress, make_progress)
        "x_config_id",
        "x_parse_sweep",
        "x__attr",
        "x__usage_dict",
        "x__outcome",
        "x__grade",
        "x_run_eval",
        "x__first_leaf",
        "xǁ_Runnerǁ*",
        "x_strategy_solver",
    ],
}

PYTEST_ARGS = ["-m", "not engine and not server", "-p", "no:cacheprovider"]
TIMEOUT_MULTIPLIER = 10.0  # mutmut's limit on a mutant's run: (its tests' duration + 1 s) times this

# mutmut's exit codes -> status (mutmut.stats.status_by_exit_code); a timeout counts as killed.
KILLED, TIMEOUT = {1, 3}, {36, -24, 24, 152, 255}


def _toml_list(items: list[str]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


def _package_entries() -> list[str]:
    """The package's top-level modules and subpackages, as paths inside the stage (``branchwise/...``)."""

    def part_of_package(path: Path) -> bool:
        if path.suffix == ".py" or path.name == "py.typed":
            return True
        return path.is_dir() and (path / "__init__.py").exists() and path.name not in ("tests", "build", "mutants")

    return [path.name for path in sorted(ROOT.iterdir()) if part_of_package(path)]


def stage(module: str, tests: list[str]) -> Path:
    """Create (or refresh) the stage folder of ``module``; returns it."""
    folder = WORK / module.removesuffix(".py").replace("/", ".")
    package = folder / "branchwise"
    package.mkdir(parents=True, exist_ok=True)
    entries = _package_entries()
    for name in entries:
        link = package / name
        if not link.is_symlink():
            link.symlink_to(ROOT / name)
    links = folder / "tests"
    if not links.is_symlink():
        links.symlink_to(ROOT / "tests")
    missing = [t for t in tests if not (ROOT / "tests" / "unit" / t).exists()]
    if missing:
        raise SystemExit(f"{module}: no such test file(s): {', '.join(missing)}")
    source_paths = [f"branchwise/{name}" for name in entries if name != "py.typed"]
    table = "\n".join(
        [
            "",
            "[tool.mutmut]",
            f"source_paths = {_toml_list(source_paths)}",
            f"only_mutate = {_toml_list(['branchwise/' + module])}",
            f"pytest_add_cli_args = {_toml_list(PYTEST_ARGS)}",
            f"pytest_add_cli_args_test_selection = {_toml_list(['tests/unit/' + t for t in tests])}",
            "use_git_change_detection = false",  # other files of the tree change under a long run
            # A mutant that makes a call wait forever (a lost wake-up) otherwise costs 15 times its tests' time
            # (about a minute for the budget). 5 times was too tight: on the loaded machine a mutant that runs
            # the whole selection (the budget's takes 10-12 s wall) was cut as a "timeout", i.e. counted killed
            # though it survives. Timeouts count as killed; changing this re-tests only the mutants that timed out.
            f"timeout_multiplier = {TIMEOUT_MULTIPLIER}",
            "",
        ]
    )
    config = (ROOT / "pyproject.toml").read_text(encoding="utf-8") + table
    target = folder / "pyproject.toml"
    if not target.exists() or target.read_text(encoding="utf-8") != config:
        target.write_text(config, encoding="utf-8")
    return folder


def _patterns(module: str) -> list[str]:
    """mutmut name patterns of the mutants of ``module`` that count (all of them unless FUNCTIONS says)."""
    dotted = "branchwise." + module.removesuffix(".py").replace("/", ".")
    return [f"{dotted}.{name}__mutmut_*" for name in FUNCTIONS.get(module, ["*"])]


def results(folder: Path, module: str) -> dict[str, int | None]:
    meta = folder / "mutants" / "branchwise" / (module + ".meta")
    if not meta.exists():
        return {}
    data: dict[str, int | None] = json.loads(meta.read_text(encoding="utf-8"))["exit_code_by_key"]
    patterns = _patterns(module)
    return {k: v for k, v in data.items() if any(fnmatch.fnmatchcase(k, p) for p in patterns)}


def summary(codes: dict[str, int | None]) -> tuple[int, int, list[str], list[str]]:
    """(killed or timed out, checked, survivors, not checked)."""
    killed = sum(1 for c in codes.values() if c in KILLED or c in TIMEOUT)
    unchecked = sorted(k for k, c in codes.items() if c is None)
    survivors = sorted(k for k, c in codes.items() if c is not None and c not in KILLED and c not in TIMEOUT)
    return killed, len(codes) - len(unchecked), survivors, unchecked


def run(module: str, *, recheck: bool) -> None:
    folder = stage(module, MODULES[module])
    env = dict(os.environ)
    command = [str(MUTMUT), "run", "--max-children", "1"]
    print(f"== {module} ({folder.relative_to(ROOT)})", flush=True)
    # With names, mutmut tests every mutant they match again, whatever it knows: a module limited to some
    # functions has them all tested afresh on every run, so a recheck of such a module that was run before skips
    # that full run and re-tests only the survivors and the mutants not checked yet (e.g. timeouts reset by a
    # change of timeout_multiplier).
    names = [p for p in _patterns(module) if module in FUNCTIONS]
    _, checked, _, unchecked = summary(results(folder, module))
    if recheck and names and checked:
        if unchecked:
            subprocess.run([*command, *unchecked], cwd=folder, env=env, check=True)
    else:
        subprocess.run([*command, *names], cwd=folder, env=env, check=True)
    _, _, survivors, _ = summary(results(folder, module))
    if recheck and survivors:
        print(f"== {module}: re-testing {len(survivors)} survivors", flush=True)
        subprocess.run([*command, *survivors], cwd=folder, env=env, check=True)


def show(modules: list[str]) -> int:
    for module in modules:
        folder = WORK / module.removesuffix(".py").replace("/", ".")
        for name in summary(results(folder, module))[2]:
            subprocess.run([str(MUTMUT), "show", name], cwd=folder, check=True)
    return 0


def report(modules: list[str]) -> int:
    total_killed = total_checked = 0
    print(f"\n{'module':32} {'killed':>7} {'checked':>8} {'score':>7}  survivors")
    for module in modules:
        folder = WORK / module.removesuffix(".py").replace("/", ".")
        killed, checked, survivors, unchecked = summary(results(folder, module))
        if not checked:
            print(f"{module:32} {'-':>7} {'-':>8} {'-':>7}  (not run)")
            continue
        total_killed, total_checked = total_killed + killed, total_checked + checked
        note = f" ({len(unchecked)} not checked)" if unchecked else ""
        print(f"{module:32} {killed:7} {checked:8} {killed / checked:7.1%}  {len(survivors)}{note}")
        for name in survivors:
            print(f"    {name}")
    if total_checked:
        print(f"{'all':32} {total_killed:7} {total_checked:8} {total_killed / total_checked:7.1%}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("modules", nargs="?", default="", help="comma-separated module paths (default: all)")
    parser.add_argument("--recheck", action="store_true", help="re-test the mutants that survived a previous run")
    parser.add_argument("--report", action="store_true", help="only print the table of the last results")
    parser.add_argument("--show", action="store_true", help="only print the diff of every survivor")
    parser.add_argument("--fresh", action="store_true", help="forget earlier results of these modules first")
    args = parser.parse_args()
    modules = [m.strip() for m in args.modules.split(",") if m.strip()] or list(MODULES)
    unknown = [m for m in modules if m not in MODULES]
    if unknown:
        parser.error(f"unknown module(s) {unknown}; known: {', '.join(MODULES)}")
    if args.show:
        return show(modules)
    if not args.report:
        if not MUTMUT.exists():
            parser.error(f"{MUTMUT} not found: install the dev extra (make setup)")
        for module in modules:
            if args.fresh:
                shutil.rmtree(WORK / module.removesuffix(".py").replace("/", "."), ignore_errors=True)
            run(module, recheck=args.recheck)
    return report(modules)


if __name__ == "__main__":
    sys.exit(main())
