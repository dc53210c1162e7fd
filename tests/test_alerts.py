"""The alert rules, checked and unit-tested with promtool: every alert has a case that fires
it and one that does not."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from .exported_metrics import unknown_metrics

RULES = Path(__file__).parent.parent / "deploy" / "prometheus" / "softwatch.rules.yml"
M = 'gen_ai_request_model="m",model_rev="r1",params_id="p1",replica="a",gen_ai_token_type="output"'
STARTS = 'ray_serve_deployment_replica_starts_total{application="softwatch",deployment="LLMServer",replica="%s"}'


def _promtool() -> str:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is not installed: run `.ci/install-prometheus` (apt-get install prometheus)")
    return binary


def _rules() -> dict[str, dict]:
    return {r["alert"]: r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}


def _annotations(rule: dict, labels: dict) -> dict:
    def render(text: str) -> str:
        return re.sub(r"{{ \$labels\.(\w+) }}", lambda m: labels.get(m.group(1), ""), text).strip()
    return {k: render(v) for k, v in rule["annotations"].items()}


def counter(rate_per_min: float, minutes: int = 60) -> str:
    return f"0+{rate_per_min}x{minutes}"


# alert -> (input series, eval time, labels of the expected alert or None for "does not fire")
CASES = {
    "SoftwatchDriftAlarm": [
        ([('softwatch_drift_alarm{kind="regime",current_regime="m@r/p2",gen_ai_request_model="m",params_id="p2"}',
           "0 0 1 1 1 1")], "5m", {"kind": "regime", "current_regime": "m@r/p2", "gen_ai_request_model": "m",
                                   "params_id": "p2"}),
        ([('softwatch_drift_alarm{kind="regime",current_regime="m@r/p2",gen_ai_request_model="m",params_id="p2"}',
           "0 0 0 0 0 1")], "5m", None),  # not for a full minute yet
    ],
    "SoftwatchNonFiniteLogits": [
        ([(f"softwatch_logits_nonfinite_total{{{M}}}", "0 0 0 3 3 3")], "5m",
         {"gen_ai_request_model": "m", "model_rev": "r1", "replica": "a"}),
        ([(f"softwatch_logits_nonfinite_total{{{M}}}", "0 0 0 0 0 0")], "5m", None),
    ],
    "SoftwatchLogitOverflow": [
        ([(f"softwatch_logits_overflow_total{{{M}}}", counter(50)), (f"softwatch_tokens_total{{{M}}}", counter(1000))],
         "30m", {"gen_ai_request_model": "m", "model_rev": "r1"}),
        ([(f"softwatch_logits_overflow_total{{{M}}}", counter(1)), (f"softwatch_tokens_total{{{M}}}", counter(1000))],
         "30m", None),
    ],
    "SoftwatchEntropyCollapse": [
        ([(f"softwatch_sequence_entropy_sum{{{M}}}", counter(0.1)), (f"softwatch_sequence_entropy_count{{{M}}}",
                                                                       counter(10))],
         "30m", {"gen_ai_request_model": "m", "params_id": "p1"}),
        ([(f"softwatch_sequence_entropy_sum{{{M}}}", counter(15)), (f"softwatch_sequence_entropy_count{{{M}}}",
                                                                      counter(10))], "30m", None),
    ],
    "SoftwatchEntropyExplosion": [
        ([(f"softwatch_sequence_entropy_sum{{{M}}}", counter(80)), (f"softwatch_sequence_entropy_count{{{M}}}",
                                                                      counter(10))],
         "30m", {"gen_ai_request_model": "m", "params_id": "p1"}),
        ([(f"softwatch_sequence_entropy_sum{{{M}}}", counter(15)), (f"softwatch_sequence_entropy_count{{{M}}}",
                                                                      counter(10))], "30m", None),
    ],
    "SoftwatchPerplexitySpike": [
        # 3 per sequence for 5 hours, then 12 per sequence
        ([(f"softwatch_sequence_perplexity_sum{{{M}}}", "0+30x300 9000+120x60"),
          (f"softwatch_sequence_perplexity_count{{{M}}}", "0+10x360")],
         "350m", {"gen_ai_request_model": "m", "params_id": "p1"}),
        ([(f"softwatch_sequence_perplexity_sum{{{M}}}", "0+30x360"),
          (f"softwatch_sequence_perplexity_count{{{M}}}", "0+10x360")], "350m", None),
    ],
    "SoftwatchNoTraffic": [
        ([(f'softwatch_sequences_total{{{M},finish_reason="stop"}}', "5x60")], "40m", {}),
        ([(f'softwatch_sequences_total{{{M},finish_reason="stop"}}', counter(5))], "40m", None),
    ],
    "SoftwatchReplicaRestarts": [
        # replica a runs throughout; b, c and d crash after two minutes each, e replaces d
        ([(STARTS % "a", "1x40"), (STARTS % "b", "_x16 1 1 stale"), (STARTS % "c", "_x19 1 1 stale"),
          (STARTS % "d", "_x22 1 1 stale"), (STARTS % "e", "_x25 1x15")], "30m",
         {"application": "softwatch", "deployment": "LLMServer"}),
        # autoscaling from 1 to 4 replicas starts 3
        ([(STARTS % "a", "1x40"), *((STARTS % r, "_x20 1x20") for r in "bcd")], "30m", None),
        # Prometheus (re)started 10 minutes ago: every series is new, none is a restart
        ([(STARTS % r, "_x20 1x20") for r in "abcde"], "30m", None),
    ],
    "SoftwatchTargetDown": [
        ([('up{job="softwatch",instance="10.0.0.1:9464"}', "1 1 0 0 0 0 0 0 0")], "8m",
         {"job": "softwatch", "instance": "10.0.0.1:9464"}),
        ([('up{job="softwatch",instance="10.0.0.1:9464"}', "1 1 0 0 1 1 1 1 1")], "8m", None),
    ],
}


def test_every_alert_has_a_firing_and_a_quiet_case():
    rules = _rules()
    assert set(CASES) == set(rules)
    for name, cases in CASES.items():
        assert any(c[2] is not None for c in cases) and any(c[2] is None for c in cases), name
        assert rules[name]["labels"]["severity"] in ("warning", "critical")
        assert {"summary", "description", "runbook"} <= set(rules[name]["annotations"]), name


def test_every_rule_names_a_metric_that_softwatch_or_ray_serve_exports():
    unknown = {name: unknown_metrics(rule["expr"]) for name, rule in _rules().items() if unknown_metrics(rule["expr"])}
    assert not unknown, unknown


def test_promtool_check_rules():
    out = subprocess.run([_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in out.stdout


def test_promtool_test_rules(tmp_path):
    rules = _rules()
    tests = []
    for name, cases in CASES.items():
        for series, at, labels in cases:
            expected = [] if labels is None else [{
                "exp_labels": {**labels, "severity": rules[name]["labels"]["severity"]},
                "exp_annotations": _annotations(rules[name], labels),
            }]
            tests.append({"interval": "1m", "input_series": [{"series": s, "values": v} for s, v in series],
                          "alert_rule_test": [{"eval_time": at, "alertname": name, "exp_alerts": expected}]})
    spec = tmp_path / "softwatch.rules.test.yml"
    spec.write_text(yaml.safe_dump({"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": tests}))
    out = subprocess.run([_promtool(), "test", "rules", str(spec)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout
