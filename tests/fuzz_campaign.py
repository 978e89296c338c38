"""The long fuzz campaign over every untrusted input (the suite runs the same targets with few examples).

  python tests/fuzz_campaign.py [--examples 5000] [--targets pth_fields,safetensors ...] [--seed 0]

Each target runs in its own subprocess, so an interpreter crash (a signal) is caught and reported like
any other finding. Prints, per target: inputs generated, inputs that loaded, time, and findings
(another exception than our error type, a hang over fuzz_targets.HANG_SECONDS, or a crash).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_one(target: str, examples: int, seed: int) -> dict:
    """Runs one target in this process (called in the subprocess); returns counts and the finding."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hypothesis_seed

    from tests import fuzz_targets

    strategy, check = fuzz_targets.TARGETS[target]
    finding = None

    @hypothesis_seed(seed)
    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(strategy)
    def run(case):
        check(case)

    start = time.time()
    try:
        run()
    except Exception as err:  # noqa: BLE001 - a finding: report it (hypothesis has shrunk it)
        finding = f"{type(err).__name__}: {str(err)[:2000]}"
    return dict(target=target, inputs=fuzz_targets.COUNTS.get(target, 0),
                loaded=fuzz_targets.COUNTS.get(f"{target}_loaded", 0),
                seconds=round(time.time() - start, 1), finding=finding)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=5000, help="examples per target")
    parser.add_argument("--targets", default="", help="comma-separated subset (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: run one target, print JSON
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args.examples, args.seed)), flush=True)
        return 0
    from tests.fuzz_targets import TARGETS

    targets = [t for t in args.targets.split(",") if t] or sorted(TARGETS)
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    print(f"{'target':<14}{'inputs':>8}{'loaded':>8}{'seconds':>9}  result", flush=True)
    failures = 0
    for target in targets:
        start = time.time()
        proc = subprocess.run([sys.executable, str(pathlib.Path(__file__).resolve()), "--one", target,
                               "--examples", str(args.examples), "--seed", str(args.seed)],
                              cwd=REPO, env=env, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode < 0 or not lines:
            failures += 1
            print(f"{target:<14}{'?':>8}{'?':>8}{time.time() - start:9.1f}  CRASH: exit {proc.returncode}; "
                  f"{proc.stderr[-800:]}", flush=True)
            continue
        result = json.loads(lines[-1][len("RESULT "):])
        failures += bool(result["finding"])
        print(f"{target:<14}{result['inputs']:>8}{result['loaded']:>8}{result['seconds']:9.1f}  "
              f"{'FINDING: ' + result['finding'] if result['finding'] else 'ok'}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
