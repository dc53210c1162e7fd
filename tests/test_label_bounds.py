"""Per-request decoding parameters must not make metric label sets without bound."""

import torch

from softwatch.completion import Completion, DecodingParams
from softwatch.records import RecordContext
from softwatch.telemetry import CUSTOM, MAX_LABELED_REGIMES, Telemetry


def completion(params: DecodingParams) -> Completion:
    regime = {"model_id": "m", "model_rev": "r", "params_id": params.params_id, **params.regime_params()}
    return Completion(request_id="x", text="", token_ids=[1, 2], prompt_tokens=3, finish_reason="length",
                      stats=torch.zeros(2, 10), summary={"perplexity": 2.0, "mean_entropy": 1.0, "mean_top_prob": 0.5},
                      regime=regime, created=0.0, ttft_s=0.01, latency_s=0.02)


def test_hundreds_of_temperatures_make_a_bounded_number_of_label_sets():
    telemetry = Telemetry("memory", instance_id="bounds")
    context = RecordContext(deployment="d", replica="r0")
    configured = DecodingParams(temperature=0.7)
    telemetry.record(completion(configured), context)  # the deployment's defaults: its first traffic
    for i in range(300):
        telemetry.record(completion(DecodingParams(temperature=round(0.001 + i * 0.0061, 4), top_k=i)), context)
    telemetry.record(completion(configured), context)

    data = telemetry.reader.get_metrics_data()
    points = {m.name: list(m.data.data_points) for rm in data.resource_metrics for sm in rm.scope_metrics
              for m in sm.metrics}
    label_sets = {frozenset(p.attributes.items()) for p in points["softwatch.sequences"]}
    assert len(label_sets) == MAX_LABELED_REGIMES + 1  # the first regimes exactly, every later one as "custom"
    by_params = {dict(s)["params_id"]: dict(s) for s in label_sets}
    assert by_params[configured.params_id]["temperature"] == 0.7
    assert by_params[CUSTOM]["temperature"] == CUSTOM and by_params[CUSTOM]["top_k"] == CUSTOM
    counts = {p.attributes["params_id"]: p.value for p in points["softwatch.sequences"]}
    assert counts[configured.params_id] == 2 and counts[CUSTOM] == 300 - (MAX_LABELED_REGIMES - 1)
    assert sum(counts.values()) == 302  # every sequence is counted, under one label set or another
    telemetry.shutdown()
