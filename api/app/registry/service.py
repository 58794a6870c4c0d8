"""The model registry as live data in PostgreSQL: every model version, its state, and an audit
trail of every change. ``registry.yaml`` seeds it at start-up; admins change it while it serves.

Every change takes the model's rows with ``FOR UPDATE``, checks the rules below, writes the new
state and its audit row, and commits: two admins changing one model take turns.

Rules: weights are whole numbers from 0 to ``MAX_WEIGHT``; a model that has an enabled stable
version with traffic keeps at least one, and a model that has none yet (registered through the
API, its versions canaries or shadows) gives none of its versions traffic until one is promoted;
a version gets traffic (a weight above 0, promotion, shadow, being enabled again with a weight)
only while at least one worker has it loaded and healthy; a version other than the stable one gets
a weight only if it knows as many classes as the stable one, unless forced (as promotion asks); a
retired or disabled version has no traffic (weight 0: workers unload it, so enabling it again
gives it traffic only once it is loaded and given a weight).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection, Iterable, Mapping, Set
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import HTTPException
from sqlalchemy import column, func, select, table, text
from sqlalchemy.ext.asyncio import AsyncSession

from api.app.registry.models import ModelVersion, RegistryChange
from contracts.messages import FAILED_TO_LOAD
from contracts.registry import MAX_VERSION, MAX_WEIGHT, ModelEntry, Registry

REGISTRY_LOCK = text("SELECT pg_advisory_xact_lock(hashtext('model_registry'))")
"""Taken by every change of the registry's versions, and by a training run taking its number."""

_TRAINING_RUNS = table("training_runs", column("model_name"), column("version"), column("status"))
"""The training domain's runs, read here by name: training depends on the registry (a run
registers the version it trained), so the registry cannot import it."""

log = logging.getLogger("api.registry")

SEED_ACTOR = "registry.yaml"
"""The actor named in the audit trail for changes made by start-up seeding."""
STABLE_WEIGHT = 100
"""The weight of a stable version seeded without one, and of a model's first promoted version
(any other promoted version takes over the weight of the stable one it replaces)."""
_FILE_TEMPLATE = re.compile(r"^\{(models_dir|trained_dir)\}(/(?!\.\.?(/|$))[^/\\\x00-\x1f]+)+$")
"""``{models_dir}/`` or ``{trained_dir}/`` then path segments: none empty, ``.`` or ``..``, no
backslash or control character, so the file stays inside that folder."""


@dataclass(frozen=True)
class Changed:
    """A model's versions as one change left them, and that change's id: the registry's
    revision they show (changes made by others since may have followed it)."""

    versions: list[ModelVersion]
    revision: int


@dataclass(frozen=True)
class Actor:
    """Who makes a change: an admin (id and email) or start-up seeding (no id)."""

    id: int | None
    email: str


def _state(row: ModelVersion, *, spec: bool = False) -> dict[str, Any]:
    state: dict[str, Any] = {
        "display_name": row.display_name,
        "channel": row.channel,
        "enabled": row.enabled,
        "weight": row.weight,
    }
    if spec:
        state["spec"] = row.spec
    return state


def _states(rows: list[ModelVersion]) -> dict[str, Any]:
    return {str(r.version): _state(r) for r in rows}


def _new_version(entry: ModelEntry) -> ModelVersion:
    weight = entry.weight if entry.weight is not None else (STABLE_WEIGHT if entry.channel == "stable" else 0)
    return ModelVersion(
        name=entry.name,
        version=entry.version,
        display_name=entry.display_name or entry.key,
        spec=entry.spec(),
        channel=entry.channel,
        enabled=entry.enabled,
        weight=weight,
    )


def _audit(
    session: AsyncSession,
    *,
    actor: Actor,
    action: str,
    model: str,
    version: int | None,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    reason: str,
    undoes: int | None = None,
) -> RegistryChange:
    change = RegistryChange(
        actor_id=actor.id,
        actor=actor.email,
        action=action,
        model=model,
        version=version,
        before=before,
        after=after,
        reason=reason,
        undoes=undoes,
    )
    session.add(change)
    return change


async def seed(*, session: AsyncSession, registry: Registry) -> int:
    """Brings the versions ``registry`` (read from ``registry.yaml``) names into the database, and
    commits: a missing version is created with the file's state; an existing one gets the file's
    spec (how to load it) and display name, and keeps the state operators gave it (channel, enabled,
    weight), so a restart never undoes a promotion or a rollback. Versions the file does not name
    are left as they are, and so is a version someone else registered (a training run, an admin)
    when the file names it with other files: it is logged and skipped. A stable version new in the
    file takes over from the model's stable one (``_make_way``): of several, the last in the file. Each creation or change is
    audited under ``SEED_ACTOR``; returns how many.

    Safe to run from several processes at once: they take turns on a transaction-level lock.
    """
    await session.execute(REGISTRY_LOCK)
    existing = {(v.name, v.version): v for v in await session.scalars(select(ModelVersion))}
    registered_by = {
        (model, version): who
        for model, version, who in await session.execute(
            select(RegistryChange.model, RegistryChange.version, RegistryChange.actor).where(
                RegistryChange.action == "register"
            )
        )
    }
    actor = Actor(None, SEED_ACTOR)
    changes = 0
    for entry in registry.models:
        row = existing.get((entry.name, entry.version))
        if row is None:
            row = _new_version(entry)
            if row.channel == "stable":
                changes += _make_way(session, existing.values(), new=row, actor=actor)
            session.add(row)
            # A stable version new in the file after this one takes over from it too: two new
            # stable entries of a model (channel left out is stable) would split the traffic.
            existing[(row.name, row.version)] = row
            after = {str(row.version): _state(row, spec=True)}
            _audit(
                session,
                actor=actor,
                action="register",
                model=row.name,
                version=row.version,
                before=None,
                after=after,
                reason="named in registry.yaml",
            )
            changes += 1
            continue
        owner = registered_by.get((row.name, row.version), SEED_ACTOR)
        if owner != SEED_ACTOR and row.spec != entry.spec():
            # A version a training run (or an admin) registered is not this file's to redefine:
            # its files and record are that run's. The file's entry is the one in the wrong.
            log.error(
                "registry.yaml names %s@%d, which %s registered with other files; the file's entry is "
                "ignored: give it another version number",
                row.name,
                row.version,
                owner,
            )
            continue
        before = _state(row, spec=True)
        row.spec = entry.spec()
        row.display_name = entry.display_name or row.display_name
        if (now := _state(row, spec=True)) != before:
            _audit(
                session,
                actor=actor,
                action="update",
                model=row.name,
                version=row.version,
                before={str(row.version): before},
                after={str(row.version): now},
                reason="registry.yaml changed",
            )
            changes += 1
    await session.commit()
    return changes


def _make_way(session: AsyncSession, rows: Iterable[ModelVersion], *, new: ModelVersion, actor: Actor) -> int:
    """A stable version new in registry.yaml takes over from the model's stable versions already in
    the database (they become canaries at weight 0, audited), as a promotion would: two stable
    versions would otherwise split the traffic. Returns how many changed."""
    changed = 0
    for other in rows:
        if other.name != new.name or other.channel != "stable":
            continue
        before = {str(other.version): _state(other)}
        other.channel, other.weight = "canary", 0
        _audit(
            session,
            actor=actor,
            action="channel_canary",
            model=other.name,
            version=other.version,
            before=before,
            after={str(other.version): _state(other)},
            reason=f"{new.name}@{new.version}, new in registry.yaml, is the stable version",
        )
        changed += 1
    return changed


async def revision(*, session: AsyncSession) -> int:
    """The registry's revision: the id of its latest change, 0 before the first."""
    return int(await session.scalar(select(func.coalesce(func.max(RegistryChange.id), 0))) or 0)


async def list_versions(*, session: AsyncSession) -> list[ModelVersion]:
    """Every model version, by name then version."""
    return list(await session.scalars(select(ModelVersion).order_by(ModelVersion.name, ModelVersion.version)))


async def list_changes(
    *, session: AsyncSession, model: str | None, skip: int, limit: int
) -> tuple[list[RegistryChange], int]:
    """A page of the audit trail, newest first (of one model when ``model`` is given), and its total."""
    where = [RegistryChange.model == model] if model is not None else []
    total = await session.scalar(select(func.count()).select_from(RegistryChange).where(*where))
    rows = await session.scalars(
        select(RegistryChange).where(*where).order_by(RegistryChange.id.desc()).offset(skip).limit(limit)
    )
    return list(rows), int(total or 0)


# --- changes by admins ----------------------------------------------------------------------


async def _lock_model(session: AsyncSession, name: str) -> list[ModelVersion]:
    """The model's versions, locked until commit, as they are once locked; 404 when it has none.

    Takes the registry's lock first: a change's id (the registry's revision, ``revision``) is
    given when its row is written, and two changes to two models committing out of that order
    would leave a process that read the higher id between them never reading the lower one's."""
    await session.execute(REGISTRY_LOCK)
    rows = list(
        await session.scalars(
            select(ModelVersion)
            .where(ModelVersion.name == name)
            .order_by(ModelVersion.version)
            .with_for_update()
            # Rows this session loaded before (the auto-promote rule keeps them across its
            # comparison) would otherwise keep their old values, and a change made meanwhile by
            # another admin would be written over: two stable versions.
            .execution_options(populate_existing=True)
        )
    )
    if not rows:
        raise HTTPException(status_code=404, detail=f"No model named {name!r}.")
    return rows


def _version(rows: list[ModelVersion], version: int) -> ModelVersion:
    row = next((r for r in rows if r.version == version), None)
    if row is None:
        raise HTTPException(status_code=404, detail=f"{rows[0].name} has no version {version}.")
    return row


def _conflict(detail: str) -> HTTPException:
    return HTTPException(status_code=409, detail=detail)


class WorkerReport(Protocol):
    """What the live workers report of one version: ``catalog.service.ModelAvailability``, which
    the registry cannot import (the catalog reads the registry)."""

    @property
    def available(self) -> bool:
        """Whether a live worker has it loaded and healthy."""
        ...

    @property
    def workers(self) -> int:
        """Live workers that have it loaded and healthy."""
        ...

    @property
    def reasons(self) -> list[str]:
        """One per live worker that tried to load it and could not: why."""
        ...


def load_failure(key: str, reported: Mapping[str, WorkerReport]) -> str | None:
    """Why version ``key`` (``name@version``) failed to load, when no live worker has it loaded
    and every one serving its model that reported it says it failed to load (``FAILED_TO_LOAD``):
    their errors, each once. None otherwise, as while a worker is still loading it. A worker still
    loading a version reports nothing of it yet, so the workers serving the model are counted as
    the most that reported any one of its versions."""
    state = reported.get(key)
    if state is None or state.workers or not state.reasons:
        return None
    if not all(reason.startswith(FAILED_TO_LOAD) for reason in state.reasons):
        return None
    name = key.rpartition("@")[0]
    serving = max(s.workers + len(s.reasons) for k, s in reported.items() if k.rpartition("@")[0] == name)
    if len(state.reasons) < serving:
        return None
    errors = sorted({reason.removeprefix(FAILED_TO_LOAD).lstrip(": ") for reason in state.reasons} - {""})
    return "; ".join(errors) or "no error given"


def _require_loaded(
    row: ModelVersion, available: Set[str], what: str, reported: Mapping[str, WorkerReport] | None = None
) -> None:
    """409 unless a live worker has ``row`` loaded and healthy (``available``: such versions'
    ``name@version``). ``reported``: what the workers report of each version; when every worker
    serving the model says it failed to load, the refusal says so, with the error, rather than
    asking to retry once it is loaded: it would not be."""
    key = f"{row.name}@{row.version}"
    if key in available:
        return
    if reported is not None and (failure := load_failure(key, reported)) is not None:
        raise _conflict(
            f"{key} cannot {what}: it failed to load on every live worker serving {row.name} ({failure}). "
            "Workers try it again only once its model file changes: replace the file, or register a fixed "
            "version."
        )
    raise _conflict(
        f"{key} cannot {what}: no live worker has it loaded and healthy yet (GET /v1/models says why); "
        "retry once it is."
    )


def _with_traffic(state: Mapping[str, Any]) -> bool:
    """Whether a version's state (``_state``) makes it an enabled stable version with traffic."""
    return bool(state["channel"] == "stable" and state["enabled"] and state["weight"] > 0)


def _check_model(rows: list[ModelVersion], before: Mapping[str, Mapping[str, Any]]) -> None:
    """The rules every model keeps after a change (the module docstring); ``before``: its
    versions' states before the change (``_states``)."""
    if any(_with_traffic(_state(r)) for r in rows):
        return
    name = rows[0].name
    if any(_with_traffic(state) for state in before.values()):
        raise _conflict(f"{name} would have no enabled stable version with traffic; promote another version first.")
    # A model registered through the API starts with canaries alone: a share of traffic is a
    # share of the stable version's, and a request naming the model goes to no canary before
    # one is promoted (``Registry.find``).
    if weighted := [r for r in rows if r.weight > 0]:
        raise _conflict(
            f"{name}@{weighted[0].version} cannot get traffic: {name} has no enabled stable version with traffic "
            f"yet. Promote a version to make it {name}'s stable version first."
        )


async def _commit_change(
    session: AsyncSession,
    rows: list[ModelVersion],
    before: dict[str, Any],
    *,
    actor: Actor,
    action: str,
    version: int | None,
    reason: str,
    undoes: int | None = None,
) -> RegistryChange:
    _check_model(rows, before)
    after = _states(rows)
    changed = {v: s for v, s in after.items() if before.get(v) != s}
    if not changed and undoes is None:
        raise _conflict("Nothing would change: the versions are in that state already.")
    change = _audit(
        session,
        actor=actor,
        action=action,
        model=rows[0].name,
        version=version,
        before={v: before[v] for v in changed if v in before},
        after=changed,
        reason=reason,
        undoes=undoes,
    )
    await session.commit()
    return change


async def register_version(
    *, session: AsyncSession, actor: Actor, entry: ModelEntry, reason: str, next_free: bool = False
) -> ModelVersion:
    """Adds a version (a new model or a new version of one), enabled, as a canary without traffic:
    workers load it within seconds, then an admin gives it traffic. Its files are named by
    ``{models_dir}/...`` or ``{trained_dir}/...`` templates, resolved on each worker. With
    ``next_free``, the version gets the next free number, taken under the registry's lock (the
    one in ``entry`` is ignored): concurrent registrations get one each.

    Raises 409 when the version exists, 422 for a file outside those two folders, a stable channel
    (a version becomes stable by promotion) or a version above ``MAX_VERSION``.
    """
    for template in (entry.file, entry.labels if entry.labels != "imagenet" else None):
        if template is not None and not _FILE_TEMPLATE.fullmatch(template):
            raise HTTPException(
                status_code=422,
                detail=f"{template!r} must start with {{models_dir}}/ or {{trained_dir}}/ and stay inside it.",
            )
    if entry.channel == "stable":
        raise HTTPException(status_code=422, detail="A new version starts as a canary or a shadow; promote it after.")
    await session.execute(REGISTRY_LOCK)
    if next_free:
        entry = entry.model_copy(update={"version": await next_version(session=session, name=entry.name)})
    if entry.version > MAX_VERSION:
        # One near PostgreSQL's integer limit would leave the model no next number for its
        # training runs and registrations, whoever registers it.
        raise HTTPException(status_code=422, detail=f"{entry.key}: version numbers go up to {MAX_VERSION}.")
    exists = await session.scalar(
        select(ModelVersion.id).where(ModelVersion.name == entry.name, ModelVersion.version == entry.version)
    )
    if exists is not None:
        raise _conflict(f"{entry.key} exists already; register the next version.")
    if entry.version in await reserved_versions(session=session, name=entry.name):
        raise _conflict(f"{entry.key} is the version a training run still going will register; register another.")
    row = _new_version(entry.model_copy(update={"weight": 0}))
    session.add(row)
    _audit(
        session,
        actor=actor,
        action="register",
        model=row.name,
        version=row.version,
        before=None,
        after={str(row.version): _state(row, spec=True)},
        reason=reason,
    )
    await session.commit()
    return row


async def stable_versions(*, session: AsyncSession, name: str) -> list[int]:
    """The model's enabled stable versions."""
    return list(
        await session.scalars(
            select(ModelVersion.version).where(
                ModelVersion.name == name, ModelVersion.channel == "stable", ModelVersion.enabled.is_(True)
            )
        )
    )


def main_stable(rows: Iterable[ModelVersion]) -> ModelVersion | None:
    """The enabled stable version with the most traffic (the newest on a tie): the one a candidate
    is compared with and a new version is trained from; None when there is none."""
    stable = [r for r in rows if r.channel == "stable" and r.enabled]
    return max(stable, key=lambda r: (r.weight, r.version), default=None)


async def reserved_versions(*, session: AsyncSession, name: str) -> set[int]:
    """The numbers queued or running training runs of ``name`` will register their versions as."""
    return set(
        await session.scalars(
            select(_TRAINING_RUNS.c.version).where(
                _TRAINING_RUNS.c.model_name == name, _TRAINING_RUNS.c.status.in_(("queued", "running"))
            )
        )
    )


async def next_version(*, session: AsyncSession, name: str) -> int:
    """The number a new version of ``name`` gets: one above its highest and above those training
    runs still to register (``reserved_versions``), 1 for a new model."""
    highest = await session.scalar(select(func.max(ModelVersion.version)).where(ModelVersion.name == name))
    return max(int(highest or 0), *await reserved_versions(session=session, name=name), 0) + 1


async def set_weights(
    *,
    session: AsyncSession,
    actor: Actor,
    name: str,
    weights: Mapping[int, int],
    reason: str,
    available: Set[str],
    classes: Mapping[str, int] | None = None,
    force: bool = False,
    reported: Mapping[str, WorkerReport] | None = None,
) -> Changed:
    """Sets the traffic weights of some of a model's versions (the others keep theirs): e.g.
    ``{1: 90, 2: 10}`` sends about one request in ten to version 2. ``classes``: how many classes
    each version (``name@version``) its live workers report; a version without one there is
    counted by the labels it published (``ModelVersion.labels``). ``reported``: what the workers
    report of each version, so that a version that failed to load is refused as such
    (``_require_loaded``).

    A version other than the stable one given a weight above 0 must know at least as many
    classes as the stable one, as promotion requires: people's pictures of the others would get
    a wrong answer. With ``force`` it gets the weight anyway, and the reason in the audit trail
    says what was forced past.

    Raises 404 for an unknown model or version, 422 for a weight below 0 or above ``MAX_WEIGHT``
    or a weight above 0 on a retired or shadow version, 409 for a weight on a disabled version,
    when a version would get traffic before a worker has it loaded, when it knows fewer classes
    than the stable version (unless ``force``), when no enabled stable version would keep
    traffic, or when a version would get traffic while the model has no stable version (a
    model's first version gets its traffic by promotion).
    """
    rows = await _lock_model(session, name)
    before = _states(rows)
    stable = main_stable(rows)
    forced: list[str] = []
    for version, weight in weights.items():
        # Checked here, not only by the callers' schemas: a weight the registry's entries cannot
        # hold would be stored, then leave the version out of service when the registry is built.
        if not 0 <= weight <= MAX_WEIGHT:
            raise HTTPException(
                status_code=422, detail=f"{name}@{version}: weights are whole numbers from 0 to {MAX_WEIGHT}."
            )
        row = _version(rows, version)
        if weight > 0 and row.channel in ("retired", "shadow"):
            raise HTTPException(
                status_code=422, detail=f"{name}@{version} is {row.channel}: it takes no traffic of its own."
            )
        if weight > 0 and not row.enabled:
            # Its workers are letting it go, or have: loaded a moment ago is no promise.
            raise _conflict(
                f"{name}@{version} is disabled: enable it, then give it traffic once a worker has it loaded."
            )
        if weight > 0 and row.weight == 0:
            _require_loaded(row, available, "get traffic", reported)
        fewer = _fewer_classes(row, stable, classes or {}) if weight > 0 and row.channel != "stable" else None
        if fewer is not None:
            if not force:
                raise _conflict(f"{fewer}. Set the weights with force and a reason to go ahead.")
            forced.append(fewer)
        row.weight = weight
    if forced:
        reason = f"{reason} [forced past the classes: {'; '.join(forced)}]"
    change = await _commit_change(session, rows, before, actor=actor, action="set_weights", version=None, reason=reason)
    return Changed(rows, change.id)


def class_count(row: ModelVersion, classes: Mapping[str, int]) -> int | None:
    """How many classes the version knows, by the one rule of promotion checks and comparisons:
    as its live workers report (``classes``: a class count by ``name@version`` of the served
    versions), else by the labels it published (``model_versions.labels``); None when neither says."""
    return classes.get(f"{row.name}@{row.version}") or len(row.labels or []) or None


_NAMED_AT_MOST = 10
"""Missing labels named in a refusal; beyond these, how many more."""


def _fewer_classes(row: ModelVersion, stable: ModelVersion | None, classes: Mapping[str, int]) -> str | None:
    """Why ``row`` must not take traffic from ``stable``, if it knows fewer classes (unknown
    counts are no evidence): the counts, and the labels it lacks when both published theirs."""
    if stable is None:
        return None
    ours, theirs = class_count(row, classes), class_count(stable, classes)
    if ours is None or theirs is None or ours >= theirs:
        return None
    why = (
        f"{row.name}@{row.version} knows {ours} classes and the stable {stable.name}@{stable.version} {theirs}: "
        f"people's pictures of the other {theirs - ours} would get a wrong answer"
    )
    if row.labels is not None and stable.labels is not None:
        known = set(row.labels)
        lacking = [label for label in stable.labels if label not in known]
        if lacking:
            more = len(lacking) - _NAMED_AT_MOST
            named = ", ".join(lacking[:_NAMED_AT_MOST]) + (f" and {more} more" if more > 0 else "")
            why += f" (it lacks {named})"
    return why


async def set_channel(
    *,
    session: AsyncSession,
    actor: Actor,
    name: str,
    version: int,
    channel: str | None,
    enabled: bool | None,
    reason: str,
    available: Set[str],
    reported: Mapping[str, WorkerReport] | None = None,
) -> Changed:
    """Puts a version in shadow (a copy of its model's traffic, answers never returned), back to
    canary, or retires it (served no more; workers unload it), and enables or disables it.
    Shadow, retired and disabled versions have no traffic of their own (weight 0). ``reported``:
    as ``set_weights``'s.

    Raises 404 for an unknown version, 422 for ``stable`` (promote instead), 409 when a shadow, or
    a version enabled again with a weight (stored before disabling set it to 0), is not loaded on
    any worker yet, or when the model would keep no enabled stable version with traffic.
    """
    if channel is None and enabled is None:
        raise HTTPException(status_code=422, detail="Nothing to change: give a channel, enabled, or both.")
    rows = await _lock_model(session, name)
    before = _states(rows)
    row = _version(rows, version)
    if channel == "stable":
        raise HTTPException(status_code=422, detail="Promote a version to make it stable.")
    if channel is not None:
        if channel == "shadow" and row.channel != "shadow":
            _require_loaded(row, available, "shadow traffic", reported)
        row.channel = channel
        if channel in ("shadow", "retired"):
            row.weight = 0
    if enabled is False:
        row.weight = 0
    elif (
        enabled
        and not row.enabled
        and (row.weight > 0 or row.channel == "shadow")
        and f"{row.name}@{row.version}" not in available
    ):
        # Its workers let it go while it was disabled: traffic now would find none.
        raise _conflict(
            f"{name}@{version} would get {'shadow ' if row.channel == 'shadow' else ''}traffic at once, and no "
            "live worker has it loaded (workers let a disabled version go): set its weight to 0 (a shadow: make "
            "it a canary), enable it, and give it traffic once a worker has loaded it."
        )
    if enabled is not None:
        row.enabled = enabled
    action = f"channel_{channel}" if channel is not None else ("enable" if enabled else "disable")
    change = await _commit_change(session, rows, before, actor=actor, action=action, version=version, reason=reason)
    return Changed(rows, change.id)


async def promote(
    *,
    session: AsyncSession,
    actor: Actor,
    name: str,
    version: int,
    reason: str,
    available: Set[str],
    reported: Mapping[str, WorkerReport] | None = None,
    compared_with: Collection[int] | None = None,
) -> Changed:
    """Makes ``version`` the model's stable version with all the stable traffic: its weight becomes
    the previous stable version's plus its own (at most ``MAX_WEIGHT``), so the model's total
    weight stays and every other canary keeps its share. {3: 9000 stable, 8: 500, 9: 500},
    promoting 8, gives {3: 0, 8: 9500, 9: 500}: 9 keeps its 5 %. A model's first promotion (no
    stable version before it) gives ``STABLE_WEIGHT``. The previous stable version stays enabled
    and loaded, as a canary without traffic, for ``rollback``, which restores every weight.
    ``reported``: as ``set_weights``'s. ``compared_with``: the enabled stable versions the caller
    read before it compared the version with them (empty: it found none, and did not compare).

    Raises 404 for an unknown version, 409 when it is retired, disabled or not loaded on any worker,
    or when the enabled stable versions, once the model's rows are locked, are no longer
    ``compared_with`` (a promotion or rollback meanwhile: two admins promoting two versions at once
    made the second stable without comparing it with the first; it must be compared again).
    """
    rows = await _lock_model(session, name)
    before = _states(rows)
    row = _version(rows, version)
    if row.channel == "retired":
        raise _conflict(f"{name}@{version} is retired; make it a canary or shadow first, then promote it.")
    if not row.enabled:
        raise _conflict(f"{name}@{version} is disabled; enable it first.")
    if row.channel == "stable" and all(r.channel != "stable" for r in rows if r is not row):
        raise _conflict(f"{name}@{version} is the stable version already.")
    stable_now = sorted(r.version for r in rows if r.channel == "stable" and r.enabled)
    if compared_with is not None and stable_now != sorted(compared_with):
        now = ", ".join(f"{name}@{v}" for v in stable_now) or "none"
        raise _conflict(
            f"{name}'s stable version changed meanwhile (now {now}); {name}@{version} is compared with the "
            "stable version before a promotion: look again, then retry."
        )
    _require_loaded(row, available, "be promoted", reported)
    # It takes over the stable traffic (of several stable versions, left by an older release,
    # all of it) on top of what it had as a canary: any other split of the total would move
    # users of the remaining canaries, or send them more than their share.
    taken = row.weight
    for other in rows:
        if other.channel == "stable" and other is not row:
            if other.enabled:
                taken += other.weight
            other.channel, other.weight = "canary", 0
    row.channel, row.weight = "stable", min(taken, MAX_WEIGHT) or STABLE_WEIGHT
    change = await _commit_change(session, rows, before, actor=actor, action="promote", version=version, reason=reason)
    return Changed(rows, change.id)


async def rollback(
    *,
    session: AsyncSession,
    actor: Actor,
    name: str,
    reason: str,
    available: Set[str],
    from_version: int | None = None,
    reported: Mapping[str, WorkerReport] | None = None,
) -> Changed:
    """Undoes the model's latest promotion that is not undone yet: every version it changed gets
    back the state it had before (the previous stable version its traffic). The version it restores
    is the only stable one after: another one stable now (made so since, by registry.yaml) becomes
    a canary at weight 0, in the same audited change.

    Raises 404 for an unknown model or ``from_version``, 409 when there is no promotion to undo, when
    ``from_version`` is given and is not the stable version once the model's rows are locked (two
    rollbacks sent at once would otherwise undo two promotions), or when a version to give
    traffic back to is retired, disabled or not loaded on any worker since (``reported``: as
    ``set_weights``'s), or when the promotion was the model's first (undoing it would leave the
    model no stable version: promote another version instead).
    """
    rows = await _lock_model(session, name)
    if from_version is not None:
        _version(rows, from_version)  # 404 for a version the model never had
        stable = [row.version for row in rows if row.channel == "stable"]
        if stable != [from_version]:
            now = f"{name}@{stable[0]} is" if stable else "no version is"
            raise _conflict(
                f"{name}@{from_version} is no longer the stable version ({now}): the registry changed meanwhile "
                "(a rollback or a promotion); look again before rolling back."
            )
    undone = select(RegistryChange.undoes).where(RegistryChange.undoes.is_not(None))
    promotion = await session.scalar(
        select(RegistryChange)
        .where(RegistryChange.model == name, RegistryChange.action == "promote", RegistryChange.id.not_in(undone))
        .order_by(RegistryChange.id.desc())
        .limit(1)
    )
    if promotion is None or not promotion.before:
        raise _conflict(f"{name} has no promotion to roll back.")
    if not any(state["channel"] == "stable" for state in promotion.before.values()):
        # Its first promotion: undone, the model would have no stable version to answer by its name.
        raise _conflict(
            f"{name}@{promotion.version} was {name}'s first stable version, promoted when it had none: there is "
            "no stable version to roll back to. Promote another version instead."
        )
    before = _states(rows)
    for version, state in promotion.before.items():
        row = _version(rows, int(version))
        if state["weight"] > 0 and (row.weight == 0 or not row.enabled):
            if row.channel == "retired" or not row.enabled:
                raise _conflict(
                    f"{name}@{version} is {'retired' if row.channel == 'retired' else 'disabled'} since; make it a "
                    "canary (or enable it) first, or promote another version."
                )
            _require_loaded(row, available, "get its traffic back", reported)
        row.channel, row.weight, row.enabled = state["channel"], state["weight"], state["enabled"]
    # A version made stable since the promotion other than by a promotion (a stable version new in
    # registry.yaml takes over at start-up) would otherwise stay stable beside the one restored,
    # and the two would split the traffic: it becomes a canary at 0, as a promotion would make it.
    restored = {int(version) for version, state in promotion.before.items() if state["channel"] == "stable"}
    demoted = [r for r in rows if restored and r.channel == "stable" and r.version not in restored]
    for row in demoted:
        row.channel, row.weight = "canary", 0
    if demoted:
        keys = ", ".join(f"{r.name}@{r.version}" for r in demoted)
        reason = f"{reason} [{keys}, stable since, made a canary at 0: one stable version]"
    change = await _commit_change(
        session,
        rows,
        before,
        actor=actor,
        action="rollback",
        version=promotion.version,
        reason=reason,
        undoes=promotion.id,
    )
    return Changed(rows, change.id)
