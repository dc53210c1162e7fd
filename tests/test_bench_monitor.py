"""`softwatch bench monitor` at a small size: its figures are measurements of a real run."""

import json

from softwatch.cli import main


def test_bench_monitor_measures_a_run_over_the_requested_store(tmp_path, capsys):
    assert main(["bench", "monitor", "--sequences", "20000", "--new", "300", "--cache", str(tmp_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["sequences_generated"] == 20000 and result["new_sequences"] == 300
    assert result["sequences"] == 20300  # counted by the monitor's regime index, not echoed
    assert result["regimes"] == 5 and result["files"] >= 5
    assert result["online_sequences_fed"] == 300  # the later run read only what was new
    assert 0 < result["run_s"] < 120 and 0 < result["first_run_s"] < 300
    assert 50 < result["peak_rss_mb"] < 8192 and 50 < result["first_peak_rss_mb"] < 8192
    assert result["report_rows"] > 0 and result["verdict"] in ("drift", "no_drift", "insufficient_data")
    assert list(tmp_path.glob("sequences-20000-v2/complete.json"))  # cached for the next run
    assert not list(tmp_path.glob("softwatch-bench-monitor-*"))  # the scratch root is gone


def test_bench_monitor_refuses_bad_flags(tmp_path, capsys):
    assert main(["bench", "monitor", "--sequences", "10", "--cache", str(tmp_path)]) == 2
    assert "--sequences must be >= 2000" in capsys.readouterr().err
    assert main(["bench", "monitor", "--sequences", "5000", "--new", "0", "--cache", str(tmp_path)]) == 2
    assert "--new must be >= 1" in capsys.readouterr().err
