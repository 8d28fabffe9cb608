"""The Space under a small version of its load test (bench/space_load_test.py): the temporary folder stays within its
budget over many sessions, bad inputs are refused with reasons, and SIGTERM leaves no file behind."""

import pytest

from bench import space_load_test as load_test

pytestmark = pytest.mark.slow


def test_space_files_stay_bounded_and_go_on_sigterm(monkeypatch):
    # A 1 MB budget and no minimum age: every request's files push the previous ones out (sequential sessions only,
    # so no client is still downloading what is deleted). Only the sweep at the start of each request runs (none on
    # the timer), so what it can delete is always the earlier requests' files.
    monkeypatch.setenv("TASKEXPERT_SPACE_CACHE_MAX_MB", "1")
    monkeypatch.setenv("TASKEXPERT_SPACE_CACHE_MIN_AGE_S", "0.01")
    monkeypatch.setenv("TASKEXPERT_SPACE_SWEEP_INTERVAL_S", "3600")
    results = load_test.run_load_test(sessions=8, clients=0, requests_per_client=1, image_side=256, time_limit=300)
    assert results["failures"] == 0, results["failure_examples"]
    samples = results["sequential"]
    one_request = samples[1]["temp_mib"]  # the files of the first request (uploads, maps, arrays)
    assert one_request > 0.3, samples  # a request does write files, so the bound below means something
    assert max(row["temp_mib"] for row in samples) <= 1.0 + 1.5 * one_request, samples
    assert samples[-1]["temp_files"] <= 2 * samples[1]["temp_files"], samples

    refusals = {row["input"]: row for row in results["refusals"]}
    assert all(row["refused"] for row in refusals.values()), refusals
    assert "exceeds the maximum file size" in refusals["too_large.png"]["message"]
    assert "this demo accepts up to 50,000,000 pixels" in refusals["too_many_pixels.png"]["message"]
    assert "must be sent as a file" in refusals["photo.jpg"]["message"]
    assert results["served_after_refusals"]

    shutdown = results["shutdown"]
    assert shutdown["exit_code"] == 0 and shutdown["leftover_files"] == 0, shutdown
    assert results["tracebacks_in_log"] == 0, results["server_log"][-3000:]
