"""The README's settings table: current with pipeline/settings.py, one row per setting, each variable read by
Settings exactly as the table names it."""

from __future__ import annotations

import os
import typing
from pathlib import Path

import pytest
from pydantic import SecretStr

from pipeline import settings_doc
from pipeline.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_the_readme_table_is_current() -> None:
    readme = (ROOT / "README.md").read_text()
    assert readme == settings_doc.replace_table(readme, settings_doc.render()), (
        "README.md's settings table is stale: run  python -m pipeline.settings_doc --write"
    )


def test_one_row_per_setting_in_declaration_order() -> None:
    rows = [line.split("|")[1].strip().strip("`") for line in settings_doc.render().splitlines()[2:]]
    assert rows == [s.env for s in settings_doc.settings()]
    assert len(rows) == len(set(rows))
    groups = [name for name, f in Settings.model_fields.items() if hasattr(f.annotation, "model_fields")]
    assert {"kafka", "model", "store", "ingest", "metrics"} <= set(groups)
    assert any(r.startswith("VECTORSTREAM_STORE__") for r in rows)


#: string settings with a format of their own: a valid value other than the default
_VALID_TEXT = {"VECTORSTREAM_STORE__METADATA_INDEXES": "lang:keyword,year:integer"}


def _other_value(setting: settings_doc.Setting) -> tuple[str, object] | None:
    """A valid value different from the default, as an environment string and as Settings should parse it."""
    info = setting.field
    default = info.get_default(call_default_factory=True)
    annotation = info.annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        other = next(a for a in args if a != default)
        return str(other), other
    base = args[0] if args and typing.get_origin(annotation) is not typing.Literal else annotation
    bounds = {a: getattr(m, a) for m in info.metadata for a in ("ge", "gt", "le", "lt") if hasattr(m, a)}
    if base is bool:
        return str(not default).lower(), not default
    if base in (int, float):
        step = 1 if base is int else 0.5
        start = default if default is not None else bounds.get("ge", bounds.get("gt", 0))
        value = start + step
        if "le" in bounds and value > bounds["le"]:
            value = start - step
        return str(value), value
    if base is str:
        text = _VALID_TEXT.get(setting.env, "other-value")
        return text, text
    if base is Path:
        return "/tmp/other", Path("/tmp/other")
    if base is SecretStr:
        return "x" * 40, "x" * 40
    return None


#: settings that are only valid together with others (KafkaSettings refuses TLS files without TLS, a SASL
#: login without SASL, a key without its certificate): set beside the one under test
_COMPANIONS = {
    "VECTORSTREAM_KAFKA__SASL_USERNAME": {"SECURITY_PROTOCOL": "SASL_SSL", "SASL_PASSWORD": "p"},
    "VECTORSTREAM_KAFKA__SASL_PASSWORD": {"SECURITY_PROTOCOL": "SASL_SSL", "SASL_USERNAME": "u"},
    "VECTORSTREAM_KAFKA__SSL_CA_FILE": {"SECURITY_PROTOCOL": "SSL"},
    "VECTORSTREAM_KAFKA__SSL_CERT_FILE": {"SECURITY_PROTOCOL": "SSL"},
    "VECTORSTREAM_KAFKA__SSL_KEY_FILE": {"SECURITY_PROTOCOL": "SSL", "SSL_CERT_FILE": "/c.pem"},
    "VECTORSTREAM_KAFKA__SSL_KEY_PASSWORD": {"SECURITY_PROTOCOL": "SSL"},
}


def test_every_variable_in_the_table_is_read_by_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("VECTORSTREAM_"):
            monkeypatch.delenv(name)
    checked = 0
    for setting in settings_doc.settings():
        other = _other_value(setting)
        if other is None:
            continue
        text, expected = other
        companions = {f"VECTORSTREAM_KAFKA__{k}": v for k, v in _COMPANIONS.get(setting.env, {}).items()}
        for name, companion in companions.items():
            monkeypatch.setenv(name, companion)
        monkeypatch.setenv(setting.env, text)
        try:
            value: object = Settings()
        finally:
            monkeypatch.delenv(setting.env)
            for name in companions:
                monkeypatch.delenv(name)
        for part in setting.path:
            value = getattr(value, part)
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        assert value == expected, f"{setting.env}={text} gave {value!r}"
        checked += 1
    assert checked == len(list(settings_doc.settings()))


def test_secrets_are_not_printed() -> None:
    table = settings_doc.render()
    from pipeline.settings import DEV_HS256_SECRET

    assert DEV_HS256_SECRET not in table
    assert "VECTORSTREAM_QUERY__HS256_SECRET" in table


def test_write_and_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{settings_doc.START}\nSTALE-ROW\n{settings_doc.END}\n\n## after\n")
    monkeypatch.setattr(settings_doc, "README", readme)
    assert settings_doc.main(["--check"]) == 1
    assert settings_doc.main(["--write"]) == 0
    assert settings_doc.main(["--check"]) == 0
    text = readme.read_text()
    assert "STALE-ROW" not in text and text.endswith(f"{settings_doc.END}\n\n## after\n")
    assert "| `VECTORSTREAM_METRICS__PORT` |" in text


def test_every_setting_is_described() -> None:
    """A new field needs a ``#:`` line (or Field(description=...)) above it in pipeline/settings.py."""
    missing = [s.env for s in settings_doc.settings() if not s.description]
    assert not missing
