"""The suite's skip policy (tests/skip_policy.py): only a missing optional dependency may skip a test."""

import pytest


def _run(pytester, body: str):
    pytester.makepyfile(test_inner=f"import pytest\n\n\ndef test_inner():\n    {body}\n")
    return pytester.runpytest("-p", "tests.skip_policy")


def test_a_skip_for_missing_data_fails_the_run(pytester):
    result = _run(pytester, 'pytest.skip("shared test data not found at ../shared/data")')
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*skipped without naming a missing optional dependency*",
                                 "*test_inner*shared test data not found*"])


@pytest.mark.parametrize("body", ['pytest.importorskip("hope_scale_no_such_module")',
                                  'from tests.skip_policy import skip_missing_dependency; '
                                  'skip_missing_dependency("triton", "GPU kernels")'])
def test_a_missing_optional_dependency_may_skip(pytester, body):
    result = _run(pytester, body)
    assert result.ret == pytest.ExitCode.OK
    result.assert_outcomes(skipped=1)
