"""The caller's filter language over document metadata, and the server-side filter every search runs with.

``search_filter`` ANDs the tenant, the access rule and the caller's filter into one store Filter.

The language (the ``filter`` field of a query request, see ``schemas/queries.py``)::

    {"must":     [condition, ...],    every one holds
     "should":   [condition, ...],    at least one holds (ignored when empty)
     "must_not": [condition, ...]}    none holds

    condition := {"key": K, "match": V}             metadata[K] == V; V a string, integer or boolean
               | {"key": K, "any": [V, ...]}        metadata[K] equals one of 1..100 strings or integers
               | {"key": K, "range": {"gt": x, "gte": x, "lt": x, "lte": x}}   a number within the bounds

Keys are the documents' metadata keys as published (``"year"``, ``"lang"``), lower-case letters, digits
and ``_``, starting with a letter (the whole key: ``"lang\\n"`` is no key). Values are what the store can
hold: integers within int64, strings of at most 1024 characters, and one type per ``any`` list (all strings
or all integers). Anything else is ``bad_request`` with a message saying what. A list-valued metadata
field matches when the list contains the value.
A document without the key fails ``match``, ``any`` and ``range`` (and so passes ``must_not``).
At most 16 conditions per clause, no nesting. A key naming a stored field that is not metadata (the tenant,
the access lists, document id, version, model, title, text...) or any path (a dot, brackets) is rejected with
``forbidden_filter_field``: the tenant and access rules are the server's, and a caller can neither name nor
widen them. The caller's filter is nested inside the server's ``must``, so it can only narrow the result.
"""

from __future__ import annotations

import re
from typing import Any

from pipeline.auth import Principal
from pipeline.store.base import (
    ACL_GROUPS,
    ACL_PUBLIC,
    ACL_USERS,
    CHUNK_INDEX,
    META_PREFIX,
    RESERVED_FIELDS,
    TENANT,
    TEXT,
    TITLE,
    Condition,
    Filter,
    Match,
    MatchAny,
    Range,
)
from schemas.queries import AnyCondition, MatchCondition, QueryFilter, RangeCondition

#: a metadata key as the document events allow it (schemas.events.MetaKey); used with fullmatch, since ``$``
#: would also match before a trailing newline
_META_KEY = re.compile(r"[a-z][a-z0-9_]{0,63}")
#: the store keeps integers as int64
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
#: the longest string value a condition may compare with (as schemas.queries.MatchValue allows)
MAX_VALUE_CHARS = 1024
#: stored top-level fields a caller can never filter on
FORBIDDEN_KEYS = RESERVED_FIELDS | {CHUNK_INDEX, TITLE, TEXT, META_PREFIX, "id", "kind"}


class FilterError(Exception):
    """The caller's filter cannot run: ``forbidden`` when it names a field it may not, else malformed."""

    def __init__(self, message: str, *, forbidden: bool) -> None:
        super().__init__(message)
        self.forbidden = forbidden


def meta_key(key: str) -> str:
    """The store key of caller metadata key ``key``, or FilterError."""
    lowered = key.strip().lower()
    if lowered in FORBIDDEN_KEYS or any(c in key for c in ".[]$*"):
        raise FilterError(f"filter key {key!r} is not a metadata field and may not be filtered on", forbidden=True)
    if not _META_KEY.fullmatch(key):
        raise FilterError(
            f"filter key {key!r} is not a metadata key (lower-case letters, digits and _, starting with a letter)",
            forbidden=False,
        )
    return f"{META_PREFIX}.{key}"


def _value(key: str, value: object) -> None:
    """FilterError unless the store can compare with ``value`` (booleans are not integers here)."""
    if isinstance(value, int) and not isinstance(value, bool) and not INT64_MIN <= value <= INT64_MAX:
        raise FilterError(f"filter value of {key!r} is outside the 64-bit integer range", forbidden=False)
    if isinstance(value, str) and len(value) > MAX_VALUE_CHARS:
        raise FilterError(
            f"filter value of {key!r} is longer than {MAX_VALUE_CHARS} characters ({len(value)})", forbidden=False
        )


def _condition(cond: MatchCondition | AnyCondition | RangeCondition) -> Condition:
    key = meta_key(cond.key)
    if isinstance(cond, MatchCondition):
        _value(cond.key, cond.match)
        return Match(key, cond.match)
    if isinstance(cond, AnyCondition):
        kinds = {type(v) for v in cond.any}
        if len(kinds) > 1:
            raise FilterError(
                f"filter 'any' of {cond.key!r} mixes strings and integers: use one type per list", forbidden=False
            )
        for v in cond.any:
            _value(cond.key, v)
        return MatchAny(key, tuple(cond.any))
    if isinstance(cond, RangeCondition):
        b = cond.range
        return Range(key, gt=b.gt, gte=b.gte, lt=b.lt, lte=b.lte)
    raise FilterError(f"unknown filter condition {cond!r}", forbidden=False)  # pragma: no cover


def caller_filter(spec: QueryFilter | dict[str, Any] | None) -> Filter | None:
    """The store Filter of a caller's filter (None when it has no conditions); raises FilterError."""
    if spec is None:
        return None
    if not isinstance(spec, QueryFilter):
        spec = QueryFilter.model_validate(spec)
    flt = Filter(
        must=tuple(_condition(c) for c in spec.must),
        should=tuple(_condition(c) for c in spec.should),
        must_not=tuple(_condition(c) for c in spec.must_not),
    )
    return flt if (flt.must or flt.should or flt.must_not) else None


def access_rule(principal: Principal) -> Filter:
    """Readable by the caller: public within the tenant, or the user listed, or one of the user's groups listed."""
    should: list[Condition] = [Match(ACL_PUBLIC, True), Match(ACL_USERS, principal.user)]
    if principal.groups:
        should.append(MatchAny(ACL_GROUPS, tuple(principal.groups)))
    return Filter(should=tuple(should))


def search_filter(principal: Principal, caller: Filter | None = None) -> Filter:
    """The one filter a search runs with: tenant == the token's tenant AND the access rule AND the caller's filter.

    It goes to the store whole, so the store enforces it inside the ANN search; nothing is filtered afterwards.
    """
    must: list[Condition] = [Match(TENANT, principal.tenant_id), access_rule(principal)]
    if caller is not None:
        must.append(caller)
    return Filter(must=tuple(must))
