"""Property-based fuzzing of every untrusted input (a modest number of examples per target; the long
campaign is `python tests/fuzz_campaign.py`): the `.pth` reader (tensor fields, mutated pickles, mutated
archives), the safetensors reader, the annotation readers and the config overrides either load
correctly or raise our own error type — never another exception, a hang or a crash."""
import pytest
from hypothesis import HealthCheck, given, settings

from tests import fuzz_targets

EXAMPLES = {"pth_fields": 200, "pth_pickle": 200, "pth_archive": 100, "safetensors": 150, "annotations": 100,
            "config_argv": 50, "config_arg": 100}


@pytest.mark.parametrize("target", sorted(fuzz_targets.TARGETS))
def test_fuzz_target(target):
    strategy, check = fuzz_targets.TARGETS[target]

    @settings(max_examples=EXAMPLES[target], deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(strategy)
    def run(case):
        check(case)

    before = fuzz_targets.COUNTS.get(target, 0)
    run()
    assert fuzz_targets.COUNTS[target] - before >= EXAMPLES[target]
