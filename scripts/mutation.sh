#!/usr/bin/env bash
# Mutation testing of the engine with mutmut (configured in pyproject.toml, [tool.mutmut]).
#
#   scripts/mutation.sh                      # every configured module, stopped after MUTATION_TIMEOUT (60 min)
#   scripts/mutation.sh 'attnprune.reduction.*' 'attnprune.scoring.*'   # only these mutants (mutmut name globs)
#
# mutmut rewrites the sources into a mutants/ folder; to keep the work tree clean, this script runs it in a copy
# of the repository's files (tracked and untracked, not ignored) under $MUTATION_DIR (default
# /tmp/attnprune-mutation). The copy is kept between runs, so a rerun tests only the mutants of functions whose
# code changed: after adding tests, pass the survivors' names (or a glob) as arguments, and delete the copy's
# mutants/mutmut-stats.json so that mutmut maps tests to functions afresh (a function added since would otherwise
# count as untested). At the end it prints, per module, how many mutants the tests killed and which survived.
# Measured on the project's 2-core machine with nothing else running: a cold run (fresh copy) of the whole
# configured scope, 2,653 mutants, MUTATION_JOBS=2, took 12.5 minutes.
#
# Environment: MUTATION_DIR (the copy), MUTATION_JOBS (parallel mutants, default 2), MUTATION_TIMEOUT (seconds for
# the whole run, default 3600), MUTATION_TESTS (test files to run instead of the configured ones, e.g.
# "tests/test_reduction.py tests/test_scoring.py": quicker, and a mutant it leaves alive may still die in the full
# selection), MUTATION_MODULES (files to mutate instead of the configured ones, e.g. "attnprune/reduction.py
# attnprune/scoring/*"), MUTATION_NICE (niceness, default 19), PYTHON (default .venv/bin/python of this repository).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
work=${MUTATION_DIR:-/tmp/attnprune-mutation}
jobs=${MUTATION_JOBS:-2}
limit=${MUTATION_TIMEOUT:-3600}
python=${PYTHON:-$repo/.venv/bin/python}
mutmut="$(dirname "$python")/mutmut"
[ -x "$mutmut" ] || { echo "mutmut is not installed: $python -m pip install -e '.[dev]'" >&2; exit 1; }

mkdir -p "$work"
# a fresh copy of the repository's files; the copy's mutants/ (mutmut's cache) stays
find "$work" -mindepth 1 -maxdepth 1 ! -name mutants -exec rm -rf {} +
(cd "$repo" && git ls-files -z --cached --others --exclude-standard | xargs -0 ls -d 2>/dev/null | tar -cf - -T -) |
    tar -xf - -C "$work"
cd "$work"
# quicker runs: other test files (MUTATION_TESTS) or fewer modules (MUTATION_MODULES), in the copy's pyproject only.
# mutmut skips decorated functions and properties, which would leave every registered scorer and ScoreContext's
# properties unmutated: in the copy, `@d def f` becomes `def f` followed by `f = d(f)` (the same objects at import).
"$python" - "${MUTATION_TESTS:-}" "${MUTATION_MODULES:-}" <<'PY'
import glob, json, re, sys, tomllib

import libcst as cst

text = open("pyproject.toml").read()
for key, value in zip(("pytest_add_cli_args_test_selection", "only_mutate"), sys.argv[1:]):
    if value:
        text = re.sub(rf"{key} = \[[^\]]*\]", f"{key} = {json.dumps(value.split())}", text)
open("pyproject.toml", "w").write(text)


class Undecorate(cst.CSTTransformer):
    def _rewrite(self, body):
        out = []
        for node in body:
            keep = [d for d in getattr(node, "decorators", []) if getattr(d.decorator, "value", "") in ("staticmethod", "classmethod")]
            if not isinstance(node, cst.FunctionDef) or not node.decorators or keep:
                out.append(node)
                continue
            value = node.name
            for decorator in reversed(node.decorators):
                value = cst.Call(func=decorator.decorator, args=[cst.Arg(value)])
            out += [node.with_changes(decorators=[]), cst.SimpleStatementLine([cst.Assign([cst.AssignTarget(node.name)], value)])]
        return out

    def leave_Module(self, original, updated):
        return updated.with_changes(body=self._rewrite(updated.body))

    def leave_IndentedBlock(self, original, updated):
        return updated.with_changes(body=self._rewrite(updated.body))


for pattern in tomllib.loads(text)["tool"]["mutmut"]["only_mutate"]:
    for path in glob.glob(pattern):
        source = open(path).read()
        rewritten = cst.parse_module(source).visit(Undecorate()).code
        if rewritten != source:
            open(path, "w").write(rewritten)
PY
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled

status=0
timeout "$limit" nice -n "${MUTATION_NICE:-19}" "$mutmut" run --max-children "$jobs" "$@" || status=$?
[ "$status" -eq 124 ] && echo "mutation run stopped after ${limit}s: the counts below are partial" >&2

# per module: killed, survived, other (timeouts, not checked); then every survivor by name
mkdir -p mutants && "$mutmut" results --all true > mutants/results.txt 2>/dev/null || true
"$python" - "$work" <<'PY'
import collections, re, sys

counts = collections.defaultdict(collections.Counter)
survivors = []
for line in open("mutants/results.txt"):
    match = re.match(r"\s*((.+?)\.x[_\u01c1].*__mutmut_\d+): (.+)$", line)
    if match:
        name, module, status = match[1], match[2], match[3].strip()
        counts[module][status] += 1
        if status == "survived":
            survivors.append(name)
print(f"{'module':32} {'mutants':>8} {'killed':>7} {'survived':>9} {'other':>6}")
for module, c in sorted(counts.items()):
    total = sum(c.values())
    print(f"{module:32} {total:8} {c['killed']:7} {c['survived']:9} {total - c['killed'] - c['survived']:6}")
print(f"survivors (read one with: cd {sys.argv[1]} && mutmut show NAME):")
print("\n".join("  " + name for name in survivors) or "  none")
PY
exit "$status"
