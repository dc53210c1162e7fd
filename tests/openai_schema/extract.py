"""Re-vendor openai_schema.json from a checkout of github.com/openai/openai-openapi:

    python tests/openai_schema/extract.py path/to/openai-openapi/openapi.json COMMIT

Keeps the response schemas the tests validate against and everything they reference, with
the documentation keywords (description, examples, x-oaiMeta) dropped: validation is unchanged.
"""

import json
import sys
from pathlib import Path

ROOTS = ("CreateChatCompletionResponse", "CreateChatCompletionStreamResponse", "CreateCompletionResponse")
DOC_KEYWORDS = {"description", "example", "examples", "x-oaiMeta", "deprecated", "title"}


def strip(node, in_properties: bool = False):
    if isinstance(node, dict):
        return {k: strip(v, k == "properties" and not in_properties) for k, v in node.items()
                if in_properties or k not in DOC_KEYWORDS}
    if isinstance(node, list):
        return [strip(v) for v in node]
    return node


def referenced(schemas: dict, roots) -> set[str]:
    seen, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        text = json.dumps(schemas[name])
        todo += [part.split('"')[0] for part in text.split('"#/components/schemas/')[1:]]
    return seen


def main(spec_path: str, commit: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    schemas = spec["components"]["schemas"]
    out = {
        "$comment": (f"Vendored from https://github.com/openai/openai-openapi (openapi.json at commit {commit}, "
                     f"OpenAPI info.version {spec['info']['version']}), MIT license "
                     "(Copyright (c) OpenAI). Only the response schemas the tests use and what they reference; "
                     "documentation keywords removed by tests/openai_schema/extract.py."),
        "components": {"schemas": {name: strip(schemas[name]) for name in sorted(referenced(schemas, ROOTS))}},
    }
    (Path(__file__).parent / "openai_schema.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
