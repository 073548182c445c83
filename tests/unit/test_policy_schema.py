"""The policy's JSON Schema (docs/policy.schema.json) is what Policy.from_dict accepts, and bad input is
refused with the field named: a string for a list, a string for a boolean, relative paths."""
import json
import os

import jsonschema
import pytest

from pvmexec.kernel import Policy

DOCS = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "policy.schema.json")

GOOD = [{}, {"root": "/"}, {"writable": ["/tmp"]}, {"network": True}, {"root": "/", "writable": [], "network": False}]
BAD = [
    ({"writable": "/tmp"}, "writable must be a list"),          # iterated by character, it made / writable
    ({"writable": ["tmp"]}, "not an absolute guest path"),
    ({"writable": [5]}, "not an absolute guest path"),
    ({"network": "false"}, "network must be true or false"),     # a non-empty string was true
    ({"network": 1}, "network must be true or false"),
    ({"root": 5}, "root must be"),
    ({"root": ""}, "root must be"),
    ({"rooot": "/"}, "unknown policy keys: rooot"),
    (["/"], "a policy is a JSON object"),
]


def test_the_published_schema_is_the_one_in_the_code():
    with open(DOCS) as f:
        assert json.load(f) == Policy.SCHEMA
    jsonschema.Draft202012Validator.check_schema(Policy.SCHEMA)


@pytest.mark.parametrize("spec", GOOD)
def test_what_the_schema_accepts_makes_a_policy(spec):
    jsonschema.validate(spec, Policy.SCHEMA)
    Policy.from_dict(spec).close()


@pytest.mark.parametrize("spec, message", BAD)
def test_what_the_schema_refuses_is_refused_with_the_field_named(spec, message):
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(spec, Policy.SCHEMA)
    with pytest.raises(ValueError, match=message):
        Policy.from_dict(spec)


def test_writable_paths_must_be_directories_under_the_root(tmp_path):
    (tmp_path / "out").mkdir()
    Policy(str(tmp_path), writable=["/out"]).close()
    with pytest.raises(ValueError, match="/nonexistent-dir is not a directory under the root"):
        Policy(str(tmp_path), writable=["/nonexistent-dir"])


def test_a_half_built_policy_leaves_nothing_behind():
    import gc
    import sys
    seen = []
    old, sys.unraisablehook = sys.unraisablehook, seen.append
    try:
        with pytest.raises(ValueError):
            Policy(root=5)
        gc.collect()
    finally:
        sys.unraisablehook = old
    assert seen == []                      # no "Exception ignored in __del__ ... no attribute 'root_fd'"
