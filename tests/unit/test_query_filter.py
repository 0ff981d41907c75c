"""The caller's filter language: metadata keys only, nested under the server's tenant and access rule."""

import pytest
from pydantic import ValidationError

from pipeline.auth import Principal
from pipeline.query_filter import FilterError, access_rule, caller_filter, meta_key, search_filter
from pipeline.store.base import (
    ACL_GROUPS,
    ACL_PUBLIC,
    ACL_USERS,
    RESERVED_FIELDS,
    TENANT,
    Filter,
    Match,
    MatchAny,
    Range,
)


def test_conditions_map_to_meta_keys():
    flt = caller_filter(
        {
            "must": [{"key": "year", "range": {"gte": 2020, "lt": 2024}}, {"key": "draft", "match": False}],
            "should": [{"key": "lang", "match": "en"}, {"key": "tags", "any": ["a", "b"]}],
            "must_not": [{"key": "n", "any": [1, 2]}],
        }
    )
    assert flt == Filter(
        must=(Range("meta.year", gte=2020, lt=2024), Match("meta.draft", False)),
        should=(Match("meta.lang", "en"), MatchAny("meta.tags", ("a", "b"))),
        must_not=(MatchAny("meta.n", (1, 2)),),
    )


def test_empty_filter_is_none():
    assert caller_filter(None) is None
    assert caller_filter({}) is None
    assert caller_filter({"must": [], "should": []}) is None


@pytest.mark.parametrize(
    "key",
    sorted(RESERVED_FIELDS)
    + [
        "meta",
        "title",
        "text",
        "chunk_index",
        "meta.year",
        "meta.tenant_id",
        "a.b",
        "tags[0]",
        "$where",
        "TENANT_ID",
    ],
)
def test_reserved_fields_and_paths_are_forbidden(key):
    with pytest.raises(FilterError) as info:
        caller_filter({"must": [{"key": key, "match": "x"}]})
    assert info.value.forbidden
    # wherever the key appears, and whatever the condition
    with pytest.raises(FilterError):
        caller_filter({"must_not": [{"key": key, "any": ["x"]}]})
    with pytest.raises(FilterError):
        caller_filter({"should": [{"key": key, "range": {"gt": 1}}]})


@pytest.mark.parametrize("key", ["Year", "1year", "year-2", "y" * 65, " year", "é", "lang\n", "year\n\n", "\nlang"])
def test_keys_that_are_not_metadata_keys_are_bad_requests(key):
    with pytest.raises(FilterError) as info:
        meta_key(key)
    assert not info.value.forbidden


@pytest.mark.parametrize(
    "bad",
    [
        {"must": [{"key": "year", "range": {}}]},  # no bound
        {"must": [{"key": "year", "match": 1.5}]},  # floats only in ranges
        {"must": [{"key": "year", "any": []}]},
        {"must": [{"key": "year", "match": "x", "any": ["y"]}]},  # one operator per condition
        {"must": [{"key": "year"}]},
        {"must": [{"key": "year", "match": "x"}] * 17},  # too many conditions
        {"must": [{"key": "year", "match": {"nested": 1}}]},
        {"filter": []},
        {"must": [{"key": "year", "range": {"gt": "2020"}}]},
    ],
)
def test_malformed_filters_fail_validation(bad):
    with pytest.raises(ValidationError):
        caller_filter(bad)


@pytest.mark.parametrize(
    "bad,says",
    [
        ({"must": [{"key": "year", "match": 2**63}]}, "64-bit"),
        ({"must": [{"key": "year", "match": -(2**63) - 1}]}, "64-bit"),
        ({"should": [{"key": "year", "any": [1, 2**64]}]}, "64-bit"),
        ({"must_not": [{"key": "year", "any": ["a", 1]}]}, "mixes strings and integers"),
        ({"must": [{"key": "year", "any": [1, "1"]}]}, "mixes strings and integers"),
    ],
)
def test_values_the_store_cannot_take_are_bad_requests(bad, says):
    with pytest.raises(FilterError, match=says) as info:
        caller_filter(bad)
    assert not info.value.forbidden


def test_values_at_the_limits_are_fine():
    flt = caller_filter(
        {
            "must": [{"key": "year", "match": 2**63 - 1}, {"key": "n", "match": -(2**63)}],
            "should": [{"key": "tags", "any": ["a", "b"]}, {"key": "ids", "any": [1, 2]}],
            "must_not": [{"key": "lang", "match": "x" * 1024}],
        }
    )
    assert flt is not None and len(flt.must) == 2


def test_search_filter_ands_tenant_access_and_caller():
    p = Principal("acme", "alice", ("ops", "eng"))
    caller = caller_filter({"must": [{"key": "lang", "match": "en"}]})
    flt = search_filter(p, caller)
    assert flt.must[0] == Match(TENANT, "acme")
    assert flt.must[1] == Filter(
        should=(Match(ACL_PUBLIC, True), Match(ACL_USERS, "alice"), MatchAny(ACL_GROUPS, ("ops", "eng")))
    )
    assert flt.must[2] is caller
    assert not flt.should and not flt.must_not  # a caller's should/must_not stay nested, they cannot widen it
    assert search_filter(p) == Filter(must=flt.must[:2])


def test_access_rule_without_groups_has_no_empty_match_any():
    assert access_rule(Principal("t", "u")) == Filter(should=(Match(ACL_PUBLIC, True), Match(ACL_USERS, "u")))
