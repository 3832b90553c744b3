"""Mutation check of the collapse rules: each mutant breaks one rule in a scratch copy of the working tree,
and the named tests must fail on it (`make mutants`, or `python tests/mutants.py [INDEX ...]`).

A rule whose mutant survives has no test that can fail when it breaks. Prints one line per mutant: CAUGHT
(with the first failing test) or MISSED; exits 1 if any was missed.
"""

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
MUTANTS = [  # (rule broken, file, line as it is, line as the mutant has it, tests that must fail)
    (
        "reset ignores the responsibility mass",
        "gmm/recovery.py",
        "return (touched & (mass < min_mass)).nonzero()[:, 0].tolist()",
        "return touched.nonzero()[:, 0].tolist()",
        ["tests/test_collapse.py"],
    ),
    (
        "reset draws its mean from any point",
        "gmm/recovery.py",
        "worst = lp.topk(max(count, math.ceil(WORST_FRACTION * lp.shape[0])), largest=False).indices",
        "worst = torch.arange(lp.shape[0], device=lp.device)",
        ["tests/test_collapse.py"],
    ),
    (
        "reset leaves the Adam moments",
        "gmm/recovery.py",
        "    stepper.reset_moments(torch.tensor(collapsed, device=model.device))\n",
        "",
        ["tests/test_collapse.py"],
    ),
    (
        "reset sets the logit to the minimum",
        "gmm/recovery.py",
        "model.logits[idx] = model.logits.mean()",
        "model.logits[idx] = model.logits.min()",
        ["tests/test_collapse.py"],
    ),
    (
        "every component reported clamped when any one is",
        "gmm/recovery.py",
        "for c in clamped.nonzero()[:, 0].tolist()]",
        "for c in range(clamped.shape[0])]",
        ["tests/test_collapse.py"],
    ),
    (
        "EM never emits its clamp events",
        "gmm/em.py",
        "acted = (smallest < clamp).nonzero()[:, 0].tolist()",
        "acted = []",
        ["tests/test_collapse.py", "tests/test_em.py"],
    ),
    (
        "a population member's reset ignores the responsibility mass",
        "gmm/population.py",
        "for i, c in (touched & self.resets & (mass < self.min_mass)).nonzero().tolist():",
        "for i, c in (touched & self.resets).nonzero().tolist():",
        ["tests/test_population.py"],
    ),
    (
        "a population member's component counts as recovered once any floored entry is off the floor",
        "gmm/population.py",
        "off = (self.stepper.floor_view > self.above).all(-1).tolist()",
        "off = (self.stepper.floor_view > self.above).any(-1).tolist()",
        ["tests/test_population.py"],
    ),
    (
        "verify tolerance widened 1e-3 -> 1.0",
        "experiments/verify.py",
        "RTOL, ATOL = 1e-3, 1e-4",
        "RTOL, ATOL = 1.0, 1e-4",
        ["tests/test_report.py"],
    ),
    (
        "verify skips the dataset fingerprint",
        "experiments/verify.py",
        "if expected != o.fingerprint:",
        "if False:",
        ["tests/test_report.py"],
    ),
    (
        "verify's sha256-mismatch branch removed",
        "experiments/verify.py",
        'if file_sha != manifest["runs_csv"].get("sha256"):\n        return False, f"FAIL: {folder}: the re-run',
        'if False:\n        return False, f"FAIL: {folder}: the re-run',
        ["tests/test_report.py"],
    ),
]
IGNORE = shutil.ignore_patterns(".venv", ".git", "__pycache__", ".hypothesis", "mlflow.db", "reports", "out")


def check(name: str, path: str, old: str, new: str, tests: list[str]) -> bool:
    with tempfile.TemporaryDirectory(prefix="mutant-") as tmp:
        copy = Path(tmp) / "repo"
        shutil.copytree(ROOT, copy, ignore=IGNORE)
        text = (copy / path).read_text()
        if text.count(old) != 1:
            print(f"STALE: {name}: the mutated line is no longer in {path}; update tests/mutants.py", flush=True)
            return False
        (copy / path).write_text(text.replace(old, new))
        # the copy comes first on sys.path (python -m runs from it), ahead of the editable install
        proc = subprocess.run([PY, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                              cwd=copy, capture_output=True, text=True)  # fmt: skip
    failed = [line for line in proc.stdout.splitlines() if line.startswith("FAILED")]
    caught = proc.returncode == 1 and bool(failed)
    last = failed[0] if failed else (proc.stdout.strip().splitlines() or ["no output"])[-1]
    print(f"{'CAUGHT' if caught else 'MISSED'}: {name}: {last}", flush=True)
    return caught


def main(argv: list[str]) -> int:
    chosen = [MUTANTS[int(i)] for i in argv] if argv else MUTANTS
    results = [check(*m) for m in chosen]
    print(f"{sum(results)} of {len(results)} mutants caught")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
