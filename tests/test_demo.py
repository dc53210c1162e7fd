"""`softwatch demo` in a short mode (a tiny model, 60 requests): it runs to the end, finds the
temperature push over every answered request, its SQL examples show the report it printed, the
report, data and metrics endpoint it names exist and are non-empty, and it stops quietly."""

import re
import subprocess
import sys
from pathlib import Path

from .prometheus import free_port


def test_demo_runs_end_to_end_in_short_mode(tmp_path):
    data = tmp_path / "demo-data"
    out = subprocess.run(
        [sys.executable, "-m", "softwatch.cli", "demo", "--engine", "softwatch", "--model", "tiny-random", "--requests", "60", "--max-tokens",
         "8", "--data", str(data), "--port", str(free_port())],
        capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    text = out.stdout
    assert "verdict for the temperature push: DRIFT" in text
    report = Path(re.search(r"HTML report:\s+(\S+)", text).group(1))
    assert report.stat().st_size > 10_000 and "<table>" in report.read_text()
    assert list(data.glob("sequences/dt=*/*.parquet")) and list(data.glob("tokens/dt=*/*.parquet"))
    endpoints = re.findall(r"metrics endpoint: (\S+)\s+\((\d+) bytes, (\d+) softwatch series\)", text)
    assert endpoints and all(int(size) > 0 and int(series) > 0 for _, size, series in endpoints)
    assert text.count("$ softwatch sql") == 3

    # the verdict is over all 30 + 30 answered requests: nothing was still unflushed
    verdict_table = text[text.index("metric"):text.index("verdict for the temperature push")]
    every_sequence = "\n".join(line for line in verdict_table.splitlines()  # repetition: sequences of 4+ tokens
                                if not line.lstrip().startswith("repetition"))
    counts = re.findall(r"(\d+)\s+(\d+)\s+(?:drift|no_drift|insufficient_data)\s*$", every_sequence, re.MULTILINE)
    assert counts and all((int(b), int(c)) == (30, 30) for b, c in counts), verdict_table
    # the third SQL example shows that very report
    last_example = text[text.rindex("$ softwatch sql"):]
    assert "drift" in last_example and "insufficient_data" not in last_example, last_example
    shutdown = text[text.index("shutting down"):]
    assert not re.search(r"error|traceback|\(raylet\)", shutdown, re.IGNORECASE), shutdown[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
