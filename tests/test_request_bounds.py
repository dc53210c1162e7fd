"""DecodingParams.validate bounds every field, for every producer (the API, the CLI, `instrument`)."""

import pytest

from softwatch.completion import DecodingParams, InvalidRequest


@pytest.mark.parametrize("fields, field", [
    ({"seed": 2**63}, "seed"), ({"seed": -(2**63) - 1}, "seed"), ({"top_k": 2**31}, "top_k"), ({"top_k": True}, "top_k"),
    ({"max_tokens": 2**31}, "max_tokens"), ({"temperature": 2.5}, "temperature"), ({"stop": ("s",) * 5}, "stop"),
    ({"stop": ("x" * 257,)}, "stop"),
])
def test_out_of_range_fields_are_refused_naming_them(fields, field):
    with pytest.raises(InvalidRequest) as refused:
        DecodingParams(**fields).validate()
    assert refused.value.field == field


def test_the_edges_of_every_range_are_accepted():
    for fields in ({"seed": 2**63 - 1}, {"seed": -(2**63)}, {"top_k": 2**31 - 1}, {"max_tokens": 2**31 - 1},
                   {"temperature": 2.0}, {"stop": ("z" * 256,) * 4}):
        DecodingParams(**fields).validate()
