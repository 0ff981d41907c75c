"""Turn files into document events: JSONL in the event schema, or folders of Markdown, text, rST and HTML.

Reading, converting, validating and versioning happen here, before anything is sent; ``vectorstream publish``
(agents/commands.py) sends the planned events with :class:`pipeline.client.DocumentPublisher`.

Versions of file documents. The ingest rules keep a document's version only moving forward, and a content
hash is not ordered, so a hash cannot be the version. Instead a small manifest per published folder (see
:func:`manifest_path`) remembers each document's content hash and the version it was published at:

* an unchanged document is re-sent with the version it already has: the worker ignores it as stale when it
  has it, and indexes it when it does not (a memory-only broker that lost it, a fresh store);
* a new or changed document gets ``max(previous + 1, now in milliseconds)``: above everything published
  before even when the manifest was lost, as long as the clock does not go back by more than the gap;
* with ``--delete-missing`` a document of the manifest whose file is gone gets a delete at a new version; the
  manifest keeps it as deleted and re-sends that delete (at the same version, a no-op once applied) on
  every later ``--delete-missing`` publish, so a delete the broker lost before it was indexed is not lost.

The manifest is written only after the broker confirmed every event of the publish.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import ValidationError

from schemas.events import (
    MAX_TEXT_CHARS,
    MAX_TITLE_CHARS,
    AccessControl,
    DocumentDelete,
    DocumentUpsert,
    document_event_adapter,
)

#: file suffix -> format of the documents read from folders (and from files named on the command line)
TEXT_FORMATS: dict[str, str] = {
    ".md": "markdown",
    ".markdown": "markdown",
    ".txt": "text",
    ".text": "text",
    ".rst": "restructuredtext",
    ".html": "html",
    ".htm": "html",
}
#: files of these suffixes hold one document event (JSON) per line
EVENT_SUFFIXES = frozenset({".jsonl", ".ndjson"})

#: folders never read (besides hidden ones, whose names start with a dot)
SKIP_DIRS = frozenset({"node_modules", "__pycache__", "venv", "site-packages"})

Event = DocumentUpsert | DocumentDelete


@dataclass(frozen=True)
class Problem:
    """Something that was not published: a file or a JSONL line, and why."""

    path: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else self.path
        return f"{where}: {self.message}"


@dataclass(frozen=True)
class FileDocument:
    """One file read and converted: what the upsert will carry (its version comes from the manifest)."""

    doc_id: str
    title: str
    text: str
    format: str
    rel_path: str


# --- doc ids ------------------------------------------------------------------------------------------------

_ID_SAFE = re.compile(r"[A-Za-z0-9_.:@/\-]")


def doc_id_for(rel_path: PurePosixPath, prefix: str = "") -> str:
    """The document id of a file: its path relative to the published folder (``notes/todo.md``).

    Characters the event schema does not allow in ids (spaces, non-ASCII, ``+``) are written ``+XX`` per
    UTF-8 byte, so distinct paths keep distinct ids (``my notes.md`` -> ``my+20notes.md``); so is a first
    character that is not a letter or digit. Raises ValueError when the id is longer than 256 characters.
    """
    text = prefix + rel_path.as_posix()
    out = []
    for i, char in enumerate(text):
        ok = _ID_SAFE.fullmatch(char) is not None and (i > 0 or char.isascii() and char.isalnum())
        out.append(char if ok else "".join(f"+{b:02X}" for b in char.encode("utf-8")))
    doc_id = "".join(out)
    if len(doc_id) > 256:
        raise ValueError(f"its document id would be {len(doc_id)} characters long (at most 256)")
    return doc_id


# --- reading files ------------------------------------------------------------------------------------------


def _decode(data: bytes) -> str:
    if b"\x00" in data[:8192]:
        raise ValueError("looks binary (NUL bytes)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = data.decode("cp1252", errors="replace")  # a legacy-encoded text file, rather than nothing
    return text.replace("\x00", "")


_MD_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.+?)\s*#*\s*$")
_FRONT_MATTER_TITLE = re.compile(r"(?m)^title:\s*['\"]?(.+?)['\"]?\s*$")
_RST_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+_.:])\1{2,}\s*$")


def _markdown_title(text: str) -> str | None:
    if text.startswith("---\n"):
        end = text.find("\n---", 4)
        if end > 0 and (m := _FRONT_MATTER_TITLE.search(text[4:end])):
            return m.group(1)
    for line in text.splitlines():
        if m := _MD_HEADING.match(line):
            return m.group(1)
    return None


def _rst_title(text: str) -> str | None:
    lines = text.splitlines()
    for i in range(len(lines) - 1):
        line, under = lines[i].strip(), lines[i + 1].strip()
        if line and not _RST_UNDERLINE.match(line) and _RST_UNDERLINE.match(under) and len(under) >= len(line):
            return line
    return None


#: elements after which HTML text gets a line break (so "<p>a</p><p>b</p>" does not read "ab")
_HTML_BLOCKS = (
    "p div section article header footer aside main nav li ul ol dl dt dd table tr td th caption pre "
    "blockquote h1 h2 h3 h4 h5 h6 br hr figure figcaption form fieldset details summary address"
).split()


def html_to_text(html: str) -> tuple[str | None, str]:
    """(title, text) of an HTML page: the ``<title>`` (or first ``<h1>``) and the visible text, one line per
    block element. BeautifulSoup with the standard library's parser: lenient with broken markup, no C deps."""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(html, "html.parser")
    title_tag = soup.find("title")
    title = " ".join(title_tag.get_text(" ").split()) if title_tag else None
    for tag in soup(["script", "style", "noscript", "template", "svg", "head", "iframe", "object", "nav"]):
        tag.decompose()
    if not title and (h1 := soup.find("h1")):
        title = h1.get_text(" ", strip=True)
    for tag in soup.find_all(_HTML_BLOCKS):
        tag.insert_after("\n")
    lines = (" ".join(line.split()) for line in soup.get_text().splitlines())
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    return title or None, text


def read_document(path: Path, rel_path: PurePosixPath, *, prefix: str = "") -> FileDocument:
    """Read and convert one file of a supported format. Raises ValueError (or OSError) saying why not."""
    fmt = TEXT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"unsupported format {path.suffix or '(no suffix)'!r}")
    doc_id = doc_id_for(rel_path, prefix)
    text = _decode(path.read_bytes())
    title: str | None
    if fmt == "html":
        title, text = html_to_text(text)
    elif fmt == "markdown":
        title = _markdown_title(text)
    elif fmt == "restructuredtext":
        title = _rst_title(text)
    else:
        title = None
    if len(text) > MAX_TEXT_CHARS:
        raise ValueError(f"{len(text)} characters of text (the event schema allows {MAX_TEXT_CHARS})")
    title = " ".join((title or path.stem).split())[:MAX_TITLE_CHARS]
    return FileDocument(doc_id=doc_id, title=title, text=text, format=fmt, rel_path=rel_path.as_posix())


def walk_folder(root: Path) -> Iterator[Path]:
    """Files under ``root`` in a stable order, without hidden files and folders or SKIP_DIRS (no symlinks
    to folders followed, so a link cannot loop or leave the folder)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in SKIP_DIRS)
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


# --- JSONL ----------------------------------------------------------------------------------------------


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False)[:3]:
        loc = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and p in {"upsert", "delete"}))
        parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def read_event_lines(path: Path, display: str | None = None) -> tuple[list[tuple[int, Event]], list[Problem]]:
    """Every line of a JSONL file validated as a document event: ``([(line number, event)], [problems])``.

    Blank lines are skipped; line numbers start at 1 as in an editor."""
    name = display or str(path)
    events: list[tuple[int, Event]] = []
    problems: list[Problem] = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                problems.append(Problem(name, f"not UTF-8 ({exc.reason} at byte {exc.start})", number))
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(Problem(name, f"not JSON: {exc.msg} (column {exc.colno})", number))
                continue
            try:
                events.append((number, document_event_adapter.validate_python(value)))
            except ValidationError as exc:
                problems.append(Problem(name, f"not a document event: {_validation_message(exc)}", number))
    return events, problems


# --- the manifest -------------------------------------------------------------------------------------------


def state_dir() -> Path:
    """``$XDG_STATE_HOME/vectorstream`` (default ``~/.local/state/vectorstream``): local state of the CLI."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "vectorstream"


def manifest_path(*, bootstrap_servers: str, topic: str, tenant: str, root: Path, prefix: str = "") -> Path:
    """Where the manifest of one published folder (or file) lives: ``<state_dir>/publish/<hash>.json``, one
    per Kafka cluster, documents topic, tenant, folder and id prefix (each is a separate set of documents).
    Kept outside the published folder, so publishing never writes into a user's notes."""
    key = json.dumps([bootstrap_servers, topic, tenant, str(root), prefix])
    return state_dir() / "publish" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


@dataclass
class ManifestEntry:
    version: int
    hash: str
    deleted: bool = False


@dataclass
class Manifest:
    """Content hash and published version per document of one folder; see the module docstring."""

    path: Path
    key: dict[str, str]
    entries: dict[str, ManifestEntry] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path, key: dict[str, str]) -> Manifest:
        try:
            data = json.loads(path.read_text())
            entries = {doc: ManifestEntry(**e) for doc, e in data["documents"].items()}
        except FileNotFoundError:
            entries = {}
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"the publish manifest {path} is unreadable ({exc}); delete it to start over") from exc
        return cls(path=path, key=key, entries=entries)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "about": "vectorstream publish: the version and content hash of each published document",
            **self.key,
            "documents": {doc: vars(e) for doc, e in sorted(self.entries.items())},
        }
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def next_version(previous: int | None, now_ms: int) -> int:
    """A version above ``previous``: the clock in milliseconds, or ``previous + 1`` if the clock is behind."""
    return now_ms if previous is None else max(previous + 1, now_ms)


def content_hash(event: DocumentUpsert) -> str:
    """Hash of everything an upsert carries except its version (a change of access rights is a change)."""
    body = event.model_dump(mode="json", exclude={"version"})
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


# --- the plan -----------------------------------------------------------------------------------------------

Kind = Literal["new", "changed", "unchanged", "deleted", "event"]


@dataclass
class Planned:
    event: Event
    kind: Kind
    #: the manifest this event updates once sent (None for JSONL events)
    manifest: Manifest | None = None


@dataclass
class PublishPlan:
    """What one ``publish`` will send, and what it will not (with reasons), before anything is sent."""

    items: list[Planned] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    manifests: list[Manifest] = field(default_factory=list)
    #: files of unsupported formats that were passed over in folders
    ignored: int = 0

    def count(self, kind: Kind) -> int:
        return sum(1 for item in self.items if item.kind == kind)

    @property
    def events(self) -> list[Event]:
        return [item.event for item in self.items]

    def commit(self) -> None:
        """Record the sent events in their manifests (call after the broker confirmed all of them)."""
        for item in self.items:
            if item.manifest is None:
                continue
            ev = item.event
            if isinstance(ev, DocumentUpsert):
                item.manifest.entries[ev.doc_id] = ManifestEntry(ev.version, content_hash(ev))
            else:
                old = item.manifest.entries.get(ev.doc_id)
                item.manifest.entries[ev.doc_id] = ManifestEntry(ev.version, old.hash if old else "", True)
        for manifest in self.manifests:
            manifest.save()


def _too_large(event: Event, max_bytes: int | None) -> str | None:
    if max_bytes is None:
        return None
    size = len(event.model_dump_json().encode())
    if size <= max_bytes:
        return None
    return f"the event is {size} bytes, above the worker's limit of {max_bytes} (ingest.max_message_bytes): split it"


def plan_publish(
    paths: Sequence[Path],
    *,
    tenant: str,
    access: AccessControl,
    bootstrap_servers: str,
    topic: str,
    prefix: str = "",
    delete_missing: bool = False,
    max_event_bytes: int | None = None,
    now_ms: int | None = None,
) -> PublishPlan:
    """Read ``paths`` (folders, files of TEXT_FORMATS, JSONL files of events) into a plan; nothing is sent.

    JSONL events are sent as they are (their tenants, versions and access are their own); files become
    upserts of ``tenant`` with ``access`` and ids from their paths relative to the folder given (a file
    given by itself: its name). ``delete_missing`` adds deletes for documents a folder's manifest lists
    whose files are gone. A document id met twice in one publish is a problem, the second time.
    """
    now = int(time.time() * 1000) if now_ms is None else now_ms
    plan = PublishPlan()
    seen: dict[str, str] = {}

    def add(item: Planned, where: Problem) -> None:
        ev = item.event
        key = ev.key
        if key in seen:
            plan.problems.append(Problem(where.path, f"document {key!r} also comes from {seen[key]}", where.line))
            return
        if (why := _too_large(ev, max_event_bytes)) is not None:
            plan.problems.append(Problem(where.path, why, where.line))
            return
        seen[key] = f"{where.path}:{where.line}" if where.line is not None else where.path
        plan.items.append(item)

    for given in paths:
        path = Path(given).expanduser()
        display = str(given)
        if not path.exists():
            plan.problems.append(Problem(display, "no such file or folder"))
            continue
        if path.is_file() and path.suffix.lower() in EVENT_SUFFIXES:
            events, problems = read_event_lines(path, display)
            plan.problems.extend(problems)
            for number, event in events:
                add(Planned(event, "event"), Problem(display, "", number))
            continue
        root = path.resolve()
        if path.is_dir():
            files = [(f, PurePosixPath(f.relative_to(root).as_posix())) for f in walk_folder(root)]
        else:
            files = [(root, PurePosixPath(root.name))]
        manifest = Manifest.load(
            manifest_path(bootstrap_servers=bootstrap_servers, topic=topic, tenant=tenant, root=root, prefix=prefix),
            {"bootstrap_servers": bootstrap_servers, "topic": topic, "tenant": tenant, "root": str(root)},
        )
        plan.manifests.append(manifest)
        present: set[str] = set()
        for file, rel in files:
            shown = str(Path(display) / rel) if path.is_dir() else display
            if file.suffix.lower() not in TEXT_FORMATS:
                if path.is_dir():
                    plan.ignored += 1
                else:
                    plan.problems.append(Problem(shown, f"unsupported format {file.suffix or '(no suffix)'!r}"))
                continue
            try:
                doc_id = doc_id_for(rel, prefix)
                present.add(doc_id)  # a file that exists but cannot be read is not "missing"
                doc = read_document(file, rel, prefix=prefix)
            except (ValueError, OSError) as exc:
                plan.problems.append(Problem(shown, str(exc)))
                continue
            old = manifest.entries.get(doc.doc_id)
            try:
                draft = DocumentUpsert(
                    type="upsert",
                    tenant_id=tenant,
                    doc_id=doc.doc_id,
                    version=0,
                    title=doc.title,
                    text=doc.text,
                    metadata={"path": doc.rel_path[:1024], "format": doc.format},
                    access=access,
                )
            except ValidationError as exc:
                plan.problems.append(Problem(shown, _validation_message(exc)))
                continue
            digest = content_hash(draft)
            if old is not None and not old.deleted and old.hash == digest:
                kind: Kind = "unchanged"
                version = old.version
            else:
                kind = "changed" if old is not None and not old.deleted else "new"
                version = next_version(old.version if old else None, now)
            add(Planned(draft.model_copy(update={"version": version}), kind, manifest), Problem(shown, ""))
        if delete_missing and path.is_dir():
            for doc_id, entry in sorted(manifest.entries.items()):
                if doc_id in present:
                    continue
                # a delete sent before is sent again at its version: a no-op unless the broker lost it
                version = entry.version if entry.deleted else next_version(entry.version, now)
                delete = DocumentDelete(type="delete", tenant_id=tenant, doc_id=doc_id, version=version)
                kind = "unchanged" if entry.deleted else "deleted"
                add(Planned(delete, kind, manifest), Problem(display, f"(deleted) {doc_id}"))
    return plan


def summarize(plan: PublishPlan, sent: int, *, strict: bool = False) -> Iterable[str]:
    """Lines of the closing summary of a publish."""
    parts = [f"{plan.count(k)} {k}" for k in ("new", "changed", "unchanged", "deleted", "event") if plan.count(k)]
    label = ", ".join(parts).replace(" event", " from JSONL") or "nothing"
    yield f"published {sent} events ({label})" if sent else f"published nothing ({label} planned)"
    if plan.ignored:
        yield f"passed over {plan.ignored} files of other formats (supported: {', '.join(sorted(TEXT_FORMATS))})"
    if plan.problems:
        verb = "nothing was sent (--strict)" if strict else "these were not published"
        yield f"{len(plan.problems)} problems, {verb}:"
        for problem in plan.problems:
            yield f"  {problem}"
