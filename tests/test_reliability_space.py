"""The Space under a small bounded load (bench/space_load_test.py): no failed request, oversized uploads refused."""

import importlib.util

import pytest
from test_space import REPO_ROOT

pytestmark = pytest.mark.slow


def test_space_holds_under_concurrent_requests():
    spec = importlib.util.spec_from_file_location("space_load_test", REPO_ROOT / "bench" / "space_load_test.py")
    load_test = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load_test)
    results = load_test.run_load_test(requests=20, clients=4, oversized=2, time_limit=240)
    assert results["failures"] == 0, results["failure_examples"]
    assert results["oversized_refused"] == 2 and results["served_after_load"]
    assert any("exceeds the maximum file size" in m for m in results["refusal_messages"])
    assert any("this demo accepts up to 50,000,000 pixels" in m for m in results["refusal_messages"])
    assert results["peak_rss_mib"] < 4096
