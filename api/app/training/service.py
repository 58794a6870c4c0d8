"""Training runs: requested by an admin (or started by the retraining trigger), trained by the
training worker, followed through its events, and registered in shadow when they end well."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import re
import shutil
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

from anyio import to_thread
from fastapi import HTTPException
from pydantic import ValidationError
from redis.asyncio import Redis
from sqlalchemy import CursorResult, and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from api.app.catalog.service import ModelAvailability, model_labels
from api.app.examples import service as examples
from api.app.examples.models import LabelledExample
from api.app.feedback.export import export_examples
from api.app.images.storage import LocalBlobStore
from api.app.registry import service as registry_service
from api.app.registry.live import entry_of
from api.app.registry.models import ModelVersion, RegistryChange
from api.app.releases import service as releases
from api.app.training.models import TrainingRun
from contracts import training
from contracts.registry import MAX_VERSION, ModelEntry, Preprocessing
from contracts.streams import REDIS_ERRORS

log = logging.getLogger("api.training")

UNFINISHED = ("queued", "running")


def trainable(entry: ModelEntry) -> bool:
    """Whether training runs can train versions of ``entry``'s model: sketch models only (the
    QuickDraw CNNs; a photo model's labelled examples are for exports)."""
    return entry.preprocessing is Preprocessing.sketch


async def base_entry(*, session: AsyncSession, name: str, base_version: int | None) -> ModelEntry:
    """The registry entry a run of ``name`` trains from: ``base_version``, or (None) the enabled
    stable version with the most traffic (``registry.service.main_stable``). Raises 404 for an
    unknown model or version, 409 when there is no stable version, 422 for a model that is not a
    sketch model."""
    rows = {r.version: r for r in await session.scalars(select(ModelVersion).where(ModelVersion.name == name))}
    if not rows:
        raise HTTPException(status_code=404, detail=f"No model named {name!r}.")
    if base_version is None:
        if (stable := registry_service.main_stable(rows.values())) is None:
            raise HTTPException(status_code=409, detail=f"{name} has no enabled stable version to start from.")
        base_version = stable.version
    if base_version not in rows:
        raise HTTPException(status_code=404, detail=f"{name} has no version {base_version}.")
    entry = entry_of(rows[base_version])
    if not trainable(entry):
        raise HTTPException(
            status_code=422, detail=f"{entry.key} is not a sketch model: only sketch models are trained here."
        )
    return entry


async def stored_versions(redis: Redis, name: str) -> set[int]:
    """The versions of ``name`` the training worker found in the model store: the folders of
    ``training.RECORDS_KEY`` (``sketch/v4``), those holding a training record. A store kept while
    the database was reset holds versions no row knows, which a new run must not be numbered as.
    A version folder without a record, or written since the trainer last looked
    (``RECORDS_SCAN_S``), is not seen: its run then fails with the reason (``model.trainer``)."""
    folder = re.compile(re.escape(name.encode()) + rb"/v([0-9]+)")
    fields = cast(list[bytes], await redis.hkeys(training.RECORDS_KEY))
    return {int(match[1]) for field in fields if (match := folder.fullmatch(field))}


async def _unfinished_run(session: AsyncSession, name: str) -> uuid.UUID | None:
    """A queued or running run of model ``name``, if any."""
    return await session.scalar(
        select(TrainingRun.id).where(TrainingRun.model_name == name, TrainingRun.status.in_(UNFINISHED)).limit(1)
    )


async def _next_run_version(session: AsyncSession, redis: Redis, name: str) -> int:
    """The number the next run of ``name`` gets: one above its highest registered version and the
    numbers runs still going hold (``registry.service.next_version``), its latest run's whatever
    its outcome (a failed run may have left its folder in the store) and the versions in the
    model store (``stored_versions``)."""
    latest_run = await session.scalar(select(func.max(TrainingRun.version)).where(TrainingRun.model_name == name))
    return max(
        await registry_service.next_version(session=session, name=name),
        int(latest_run or 0) + 1,
        max(await stored_versions(redis, name), default=0) + 1,
    )


async def _no_number_left(session: AsyncSession, redis: Redis, name: str, version: int) -> HTTPException:
    """The 409 for a run of ``name`` whose number, ``version``, is above ``MAX_VERSION``: what
    holds the number below it, and why waiting or retrying would not help."""
    taken = version - 1
    registered = await session.scalar(
        select(ModelVersion.id).where(ModelVersion.name == name, ModelVersion.version == taken)
    )
    run = await session.scalar(
        select(TrainingRun).where(TrainingRun.model_name == name, TrainingRun.version == taken).limit(1)
    )
    if registered is not None:
        holder = f"{name}@{taken} is registered"
    elif run is not None:
        holder = f"training run {run.id} ({run.status}) took {name}@{taken}"
    elif taken in await stored_versions(redis, name):
        holder = f"the model store (TRAINED_DIR) holds {name}/v{taken}"
    else:
        holder = f"{name}@{taken} is taken"
    return HTTPException(
        status_code=409,
        detail=f"{name} cannot be trained here any more: its next version would be {name}@{version}, and version "
        f"numbers go up to {MAX_VERSION} ({holder}). A number is never given twice, and a registered version is "
        "never deleted or renumbered (a retired one keeps its number), so no run of it could register what it "
        "trains. To train on, register the version to start from under a new model name "
        "(POST /v1/admin/registry/versions) and train that model.",
    )


async def create_run(
    *,
    session: AsyncSession,
    redis: Redis,
    store: LocalBlobStore,
    data_dir: Path,
    actor: registry_service.Actor,
    name: str,
    base_version: int | None,
    options: training.TrainingOptions,
    reason: str,
    trigger: str = "admin",
    availability: Mapping[str, ModelAvailability] | None = None,
) -> TrainingRun:
    """Queues the training of the model's next version from ``base_version`` (its categories and
    input; None: the stable version) on QuickDraw plus users' labelled examples, exported for it
    under ``data_dir/<run id>``. Raises 404 for an unknown model or version, 409 when the model
    has no stable version or a run of it is already queued or running, or when ``availability``
    (the workers' word on each version) says why the base version is not served (not trained on
    this server, being trained, a file that does not load), 422 for a model that is not a sketch
    model, 503 when its labels are not known yet otherwise (no worker has reported it yet), and 409
    when its version number would be above ``contracts.registry.MAX_VERSION`` (a version
    registered by hand near it leaves runs no number to register under): checked before the
    examples are exported, and again once the number is taken under the registry's lock."""
    base = await base_entry(session=session, name=name, base_version=base_version)
    if busy := await _unfinished_run(session, name):
        raise HTTPException(status_code=409, detail=f"A training run of {name} is queued or running ({busy}).")
    # Refused before the export and the training: the registration at the end would refuse it.
    if (version := await _next_run_version(session, redis, name)) > MAX_VERSION:
        raise await _no_number_left(session, redis, name, version)
    # PostgreSQL keeps the labels of a version no worker serves any more (a retired base).
    categories = await model_labels(redis, base, session=session)
    state = (availability or {}).get(base.key)
    if not categories and state is not None and (why := state.reason()):
        # Workers say why they do not serve it (not trained on this server, being trained, a file
        # that does not load): waiting a few seconds would not help.
        raise HTTPException(status_code=409, detail=f"{base.key} cannot be trained from now: {why}")
    if not categories:
        raise HTTPException(
            status_code=503,
            detail=f"The labels of {base.key} are not known until a worker serving it has started; retry shortly.",
            headers={"Retry-After": "5"},
        )
    run = TrainingRun(
        id=uuid.uuid4(),
        model_name=name,
        base_version=base.version,
        status="queued",
        trigger=trigger,
        requested_by=actor.email,
        reason=reason,
        options=options.model_dump(),
        categories=list(categories),
        history=[],
    )
    out = data_dir / str(run.id)
    summary = await export_examples(session=session, store=store, out=out, model=name)
    run.examples = await examples.counts(session=session, model_name=name) | {"exported": summary.examples}
    try:
        # Numbered under the registry's lock, held until the run is committed: a version
        # registered meanwhile gets another number (``registry.service.next_version`` skips
        # those runs hold), and this run none a registration just took.
        await session.execute(registry_service.REGISTRY_LOCK)
        # Checked again under the lock: a run of the model committed while this one exported.
        if busy := await _unfinished_run(session, name):
            raise HTTPException(status_code=409, detail=f"A training run of {name} is queued or running ({busy}).")
        # Registered meanwhile (a version near the limit, or a run's): refused as before the export.
        if (version := await _next_run_version(session, redis, name)) > MAX_VERSION:
            raise await _no_number_left(session, redis, name, version)
        run.version = version
        session.add(run)
        await session.commit()
    except IntegrityError:
        await session.rollback()
        await to_thread.run_sync(functools.partial(shutil.rmtree, out, ignore_errors=True))  # no row will name it
        raise HTTPException(
            status_code=409,
            detail=f"A training run of {name} (version {version}) was started at the same moment: it is queued now.",
        ) from None
    except BaseException:
        await to_thread.run_sync(functools.partial(shutil.rmtree, out, ignore_errors=True))
        raise
    job = training.TrainingJob(
        run_id=str(run.id),
        model=name,
        version=version,
        categories=list(categories),
        options=options,
        feedback_dir=str(out),
    )
    await redis.xadd(training.JOB_STREAM, job.to_fields())
    return run


async def get_run(*, session: AsyncSession, run_id: uuid.UUID) -> TrainingRun:
    """The run; 404 when there is none."""
    run = await session.get(TrainingRun, run_id)
    if run is None:
        raise HTTPException(status_code=404, detail=f"No training run {run_id}.")
    return run


async def list_runs(*, session: AsyncSession, model: str | None, skip: int = 0, limit: int = 50) -> list[TrainingRun]:
    """A page of the runs (of one model when given), newest first: ``skip`` runs, then at most
    ``limit``."""
    where = [TrainingRun.model_name == model] if model is not None else []
    query = (
        select(TrainingRun)
        .where(*where)
        .order_by(TrainingRun.created_at.desc(), TrainingRun.id.desc())
        .offset(skip)
        .limit(limit)
    )
    return list(await session.scalars(query))


async def count_runs(*, session: AsyncSession, model: str | None) -> int:
    """How many runs there are (of one model when given)."""
    where = [TrainingRun.model_name == model] if model is not None else []
    return int(await session.scalar(select(func.count()).select_from(TrainingRun).where(*where)) or 0)


async def cancel_run(*, session: AsyncSession, redis: Redis, run_id: uuid.UUID) -> TrainingRun:
    """Cancels a queued run at once and a running one within seconds, part-way through its epoch
    (the trainer checks every second or so), or before it is kept when its last epoch is over (the
    trainer reports it; until then the run stays ``running`` with ``cancel_requested_at`` set, the
    time of the first request). Raises 404 for an unknown run, 409 for one that ended."""
    # Locked and read afresh: the trainer's events (``apply_event``) may end the run meanwhile,
    # and a run that ended must answer 409, not be marked as being cancelled.
    run = await session.get(TrainingRun, run_id, with_for_update=True, populate_existing=True)
    if run is None:
        raise HTTPException(status_code=404, detail=f"No training run {run_id}.")
    if run.status not in UNFINISHED:
        raise HTTPException(status_code=409, detail=f"The run ended already ({run.status}).")
    if await redis.exists(training.ended_key(str(run.id))):
        # The trainer has reported the end, which is on its way to this row: too late to cancel.
        raise HTTPException(status_code=409, detail="The run ended already; its end is being recorded.")
    await redis.set(training.cancel_key(str(run.id)), "1", ex=7 * 86400)
    now = datetime.now(UTC)
    if run.status == "queued":
        run.status, run.finished_at, run.error = "cancelled", now, "cancelled before it started"
    elif run.cancel_requested_at is None:
        run.cancel_requested_at = now
    await session.commit()
    return run


async def training_record(
    *, session: AsyncSession, redis: Redis, name: str, version: int
) -> tuple[TrainingRun | None, dict[str, Any]]:
    """The run that trained ``name@version`` and its record; for a version no run trained, the
    ``metrics.json`` beside its model file as the training worker published it (``run`` None).
    Raises 404 for an unknown version or one without a record (not trained here, or no training
    worker has read its folder yet)."""
    run = await session.scalar(
        select(TrainingRun).where(TrainingRun.model_name == name, TrainingRun.version == version)
    )
    if run is not None and run.status == "done" and run.record is not None:
        return run, run.record
    row = await session.scalar(select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == version))
    if row is None:
        if run is not None and run.status not in UNFINISHED:
            why = f": {run.error}" if run.error else ""
            raise HTTPException(
                status_code=404,
                detail=f"No version {name}@{version}: training run {run.id}, which was to make it, "
                f"ended {run.status}{why}.",
            )
        raise HTTPException(status_code=404, detail=f"No version {name}@{version}.")
    if run is not None and run.status in UNFINISHED:
        raise HTTPException(status_code=404, detail=f"{name}@{version}'s training run is {run.status}: no record yet.")
    if source := row.spec.get("quantized_from"):
        raise HTTPException(
            status_code=404,
            detail=f"No training record for {name}@{version}: it is {source} quantized to INT8 by model.prepare, "
            f"not trained (see {source}'s record).",
        )
    folder = training.record_folder(str(row.spec.get("file") or ""))
    text = await redis.hget(training.RECORDS_KEY, folder) if folder else None
    if text is None:
        raise HTTPException(
            status_code=404,
            detail=f"No training record for {name}@{version}: "
            + (
                "no training worker has published a metrics.json from its folder."
                if folder
                else "it was not trained by this portal."
            ),
        )
    try:
        record = json.loads(text)
    except ValueError:
        record = None
    if not isinstance(record, dict):
        raise HTTPException(status_code=404, detail=f"{name}@{version}'s metrics.json is not readable.")
    return None, record


AUTO_PROMOTE_ACTOR = registry_service.Actor(None, "auto-promote rule")


async def auto_promote(
    *,
    session: AsyncSession,
    availability: dict[str, ModelAvailability],
    margin: float,
    wait_seconds: float,
) -> list[TrainingRun]:
    """The auto-promote rule over the runs that ended well in the last ``wait_seconds`` and are
    not decided yet: a candidate still in shadow and served is promoted when
    ``releases.service.compare`` finds it not worse than the stable version by more than
    ``margin``, and not promoted (with the numbers) when it is worse; one with no evidence yet, or
    not served yet, waits, and is left to an admin after ``wait_seconds``. Writes each decision
    into ``run.promotion`` (committed) and returns the runs decided."""
    now = datetime.now(UTC)
    runs = list(
        await session.scalars(
            select(TrainingRun)
            .where(
                TrainingRun.status == "done",
                TrainingRun.promotion.is_(None),
                TrainingRun.finished_at > now - timedelta(seconds=2 * wait_seconds),
            )
            .order_by(TrainingRun.finished_at)
        )
    )
    decided: list[TrainingRun] = []
    for run in runs:
        run_id, name, version = run.id, run.model_name, run.version
        rows = {r.version: r for r in await session.scalars(select(ModelVersion).where(ModelVersion.name == name))}
        row, stable = rows.get(version), registry_service.main_stable(rows.values())
        waited = (now - (run.finished_at or now)).total_seconds()
        state = availability.get(f"{name}@{version}")
        if row is None:
            decision = "not promoted: the version is no longer registered"
        elif row.channel != "shadow":
            mover = await _moved_by(session=session, name=name, version=version, channel=row.channel)
            decision = f"not promoted: it was moved to {row.channel} first, by {mover}"
        elif not row.enabled:
            decision = "not promoted: an admin disabled it"
        elif stable is None or stable.version != run.base_version:
            # Held-out accuracies of versions trained from different bases (other categories, say)
            # are not comparable: an admin decides.
            where = f"@{stable.version}" if stable is not None else "none"
            decision = (
                f"not promoted: trained from @{run.base_version}, the stable version is {where}; left to an admin"
            )
        elif state is None or not state.available:
            if waited < wait_seconds:
                continue
            decision = f"not promoted: no worker served it within {wait_seconds:g} s; left to an admin"
        else:
            try:
                comparison = await releases.compare(
                    session=session,
                    name=run.model_name,
                    candidate=run.version,
                    baseline=None,
                    availability=availability,
                    margin=margin,
                    days=7,
                )
            except HTTPException as exc:
                decision = f"not promoted: {exc.detail}"
            else:
                numbers = "; ".join(comparison.reasons)
                if comparison.verdict == "no_evidence":
                    if waited < wait_seconds:
                        continue
                    decision = "not promoted: nothing to compare it on; left to an admin"
                elif comparison.verdict == "worse":
                    decision = f"not promoted: worse than the stable version: {numbers}"
                else:
                    # Written before the promotion, whose commit then records both at once.
                    run.promotion = decision = f"promoted: {numbers}"
                    try:
                        await releases.promote(
                            session=session,
                            actor=AUTO_PROMOTE_ACTOR,
                            name=name,
                            version=version,
                            reason=f"auto-promote rule after training run {run_id}: {numbers}",
                            force=False,
                            availability=availability,
                            margin=margin,
                        )
                    except HTTPException as exc:
                        await session.rollback()
                        decision = f"not promoted: {exc.detail}"
        run = await session.get_one(TrainingRun, run_id)
        run.promotion = decision
        await session.commit()
        decided.append(run)
        log.info("training run %s: %s@%s %s", run_id, name, version, decision)
        if decision.startswith("promoted"):
            try:
                disabled = await step_down_older_canaries(session=session, name=name, version=version)
            except HTTPException as exc:
                # Left enabled until the rule's next promotion of the model, which disables them then.
                await session.rollback()
                log.warning(
                    "%s: the former stable versions not disabled after %s@%s: %s", name, name, version, exc.detail
                )
            else:
                if disabled:
                    log.info(
                        "%s: former stable versions %s disabled; the one before %s@%s stays",
                        name,
                        disabled,
                        name,
                        version,
                    )
    return decided


async def _demoted_by_the_rule(*, session: AsyncSession, name: str, version: int, before: int) -> bool:
    """Whether the last change of ``name@version`` (one that changed its state: its channel,
    weight, enabling, name) is a promotion by the auto-promote rule older than change ``before``
    that moved it from stable to canary: nobody gave it traffic, enabled it again or rolled back
    to it since."""
    key = str(version)
    change = await session.scalar(
        select(RegistryChange)
        .where(RegistryChange.model == name, RegistryChange.after.has_key(key))
        .order_by(RegistryChange.id.desc())
        .limit(1)
    )
    return (
        change is not None
        and change.id < before
        and change.action == "promote"
        and change.actor == AUTO_PROMOTE_ACTOR.email
        and ((change.before or {}).get(key) or {}).get("channel") == "stable"
        and ((change.after or {}).get(key) or {}).get("channel") == "canary"
    )


async def step_down_older_canaries(*, session: AsyncSession, name: str, version: int) -> list[int]:
    """Disables, audited as the auto-promote rule, the model's former stable versions that earlier
    promotions of the rule made canaries without traffic, once the rule has promoted ``version``:
    the promotion keeps the previous stable version enabled and loaded for a rollback, and every
    worker and explainer keeps each enabled version loaded, so promotion after promotion they
    would pile up. The version this promotion replaced (the rollback target) stays enabled. They
    stay registered: an admin enables one again to roll back further, pin or compare it.
    Versions an admin changed since (traffic given, enabled again, rolled back to) are left
    alone, as is every version once ``version``'s is no longer the model's latest promotion or
    rollback (an admin's came meanwhile). The versions disabled, oldest first; commits each
    change."""
    changed: list[int] = []
    while True:
        # Read under the registry's lock, which the change below keeps until its commit, as
        # ``step_down_older_shadows`` does: an admin's promotion or rollback comes before or after.
        await session.execute(registry_service.REGISTRY_LOCK)
        latest = await session.scalar(
            select(RegistryChange)
            .where(RegistryChange.model == name, RegistryChange.action.in_(("promote", "rollback")))
            .order_by(RegistryChange.id.desc())
            .limit(1)
        )
        ours = latest is not None and (latest.action, latest.version) == ("promote", version)
        if latest is None or not ours or latest.actor != AUTO_PROMOTE_ACTOR.email:
            await session.commit()  # ends the transaction, which lets the lock go
            return changed
        rows = await session.scalars(
            select(ModelVersion)
            .where(
                ModelVersion.name == name,
                ModelVersion.channel == "canary",
                ModelVersion.enabled.is_(True),
                ModelVersion.weight == 0,
            )
            .order_by(ModelVersion.version)
            .execution_options(populate_existing=True)
        )
        older = [
            row.version
            for row in rows
            if await _demoted_by_the_rule(session=session, name=name, version=row.version, before=latest.id)
        ]
        if not older:
            await session.commit()
            return changed
        await registry_service.set_channel(
            session=session,
            actor=AUTO_PROMOTE_ACTOR,
            name=name,
            version=older[0],
            channel=None,
            enabled=False,
            reason=f"superseded: the auto-promote rule promoted {name}@{version}, and the version it replaced "
            "stays enabled for a rollback (disabled: not loaded; enable it to roll back to, pin or compare it)",
            available=set(),
        )
        changed.append(older[0])


def recipe(base: ModelEntry | None, *, epochs: int) -> training.TrainingOptions:
    """The options a run started by the trigger trains with: its base version's recipe (the
    registry entry's ``training`` block, sketch@3's VGG-style CNN say), so that the candidate
    is comparable with the version it would replace, for ``epochs`` epochs. A block that is no
    valid ``TrainingOptions`` (a key it does not know, a value out of range) is logged and the
    defaults are used."""
    fields = {
        k: v for k, v in ((base.training or {}) if base else {}).items() if k in training.TrainingOptions.model_fields
    }
    try:
        return training.TrainingOptions.model_validate({**fields, "epochs": epochs})
    except ValidationError as exc:
        log.warning("the training recipe of %s is not usable (%s): default options", base.key if base else None, exc)
        return training.TrainingOptions(epochs=epochs)


DISPLAY_NAME_MAX = 200
"""``ModelEntry.display_name``'s limit."""
_RETRAINED_SUFFIX = re.compile(r"( \(v[0-9]+, retrained\))+$")


def _retrained_name(base_name: str, version: int) -> str:
    """``"<base name> (vN, retrained)"`` (the base's own "(vM, retrained)" left out), the base's name shortened (ending in "…") so that the
    whole stays within DISPLAY_NAME_MAX: a base named up to the limit must not make its
    retrained version's entry invalid (its run would never be registered)."""
    # A version retrained from a retrained one is named after the original, not after a chain.
    base_name = _RETRAINED_SUFFIX.sub("", base_name)
    suffix = f" (v{version}, retrained)"
    room = DISPLAY_NAME_MAX - len(suffix)
    if len(base_name) > room:
        base_name = base_name[: room - 1].rstrip() + "…"
    return base_name + suffix


def trained_entry(run: TrainingRun, base: ModelEntry) -> ModelEntry:
    """The registry entry of the version a run trained: its files under ``{trained_dir}``, fed as
    its base version is, in shadow."""
    folder = f"{{trained_dir}}/{run.model_name}/v{run.version}"
    accuracy = (run.record or {}).get("test_accuracy")
    return ModelEntry(
        name=run.model_name,
        version=run.version,
        channel="shadow",
        display_name=_retrained_name(base.display_name or base.name, run.version),
        description=f"Trained by run {run.id} from @{run.base_version}"
        + (f" (held-out accuracy {accuracy:.4f})" if isinstance(accuracy, float) else ""),
        runtime=base.runtime,
        file=f"{folder}/model.keras",
        labels=f"{folder}/labels.txt",
        input=base.input,
        preprocessing=base.preprocessing,
        training={**run.options, "run": str(run.id)},
    )


async def step_down_older_shadows(
    *, session: AsyncSession, actor: registry_service.Actor, name: str, version: int
) -> list[int]:
    """Makes the model's older shadow versions (numbers below ``version``: an end reported late
    never demotes a newer candidate) that a training run put in shadow disabled canaries without
    traffic (audited, as ``actor``), once ``version`` is its newest candidate in shadow: each
    shadow gets a copy of the model's requests, and every worker and explainer keeps each enabled
    version loaded, so candidates left run after run would multiply the workers' load and memory.
    They stay registered: an admin enables one again to pin, compare or promote it. Versions an
    admin put in shadow are left alone. The versions changed, oldest first; commits each change."""
    changed: list[int] = []
    while True:
        # Read under the registry's lock, which the change below keeps until its commit: an admin
        # promoting one of these versions meanwhile must not have it stepped down a moment later.
        await session.execute(registry_service.REGISTRY_LOCK)
        rows = await session.scalars(
            select(ModelVersion)
            .where(ModelVersion.name == name, ModelVersion.channel == "shadow", ModelVersion.version < version)
            .order_by(ModelVersion.version)
            .execution_options(populate_existing=True)
        )
        older = [
            row.version
            for row in rows
            if (row.spec.get("training") or {}).get("run")
            and await _shadowed_by_a_training_run(session=session, name=name, version=row.version)
        ]
        if not older:
            await session.commit()  # ends the transaction, which lets the lock go
            return changed
        await registry_service.set_channel(
            session=session,
            actor=actor,
            name=name,
            version=older[0],
            channel="canary",
            enabled=False,
            reason=f"superseded in shadow by {name}@{version}, a newer training run's candidate (disabled: "
            "not loaded; enable it to pin, compare or promote it)",
            available=set(),
        )
        changed.append(older[0])


RUN_ACTOR_PREFIX = "training run "
"""How the audit trail names a training run that changed the registry (``training run <id>``)."""


async def _shadowed_by_a_training_run(*, session: AsyncSession, name: str, version: int) -> bool:
    """Whether the last change that moved ``name@version`` into shadow (registered it there, or
    changed its channel to it) was a training run's, not an admin's (a version an admin set back
    to shadow, or rolled back into it, stays there)."""
    key = str(version)
    channel_after = RegistryChange.after[key]["channel"].astext
    channel_before = func.coalesce(RegistryChange.before[key]["channel"].astext, "")
    actor = await session.scalar(
        select(RegistryChange.actor)
        .where(RegistryChange.model == name, channel_after == "shadow", channel_before != "shadow")
        .order_by(RegistryChange.id.desc())
        .limit(1)
    )
    return actor is not None and actor.startswith(RUN_ACTOR_PREFIX)


async def _moved_by(*, session: AsyncSession, name: str, version: int, channel: str) -> str:
    """Who last moved ``name@version`` to ``channel``, as people read it: "a newer training run
    (training run <id>)" or "admin@example.com"; "an unknown change" when the audit trail does not say."""
    key = str(version)
    # The change that moved it there, not a later one that left its channel as it was.
    moved = (
        RegistryChange.after[key]["channel"].astext == channel,
        func.coalesce(RegistryChange.before[key]["channel"].astext, "") != channel,
    )
    actor = await session.scalar(
        select(RegistryChange.actor)
        .where(RegistryChange.model == name, *moved)
        .order_by(RegistryChange.id.desc())
        .limit(1)
    )
    if actor is None:
        return "an unknown change"
    return f"a newer training run ({actor})" if actor.startswith(RUN_ACTOR_PREFIX) else actor


def _progressed(run: TrainingRun, event: training.TrainingEvent) -> bool:
    """Whether a ``progress`` event is ahead of what ``run`` holds. Events come at least once and
    may come late (one claimed again after its API process died is handled after later ones): one
    of an epoch the history has, or at or before the step the run holds, would move the run's
    progress backwards."""
    finished = max((int(entry.get("epoch") or 0) for entry in run.history), default=0)
    if event.epoch <= finished:
        return False
    held = run.progress or {}
    return (event.epoch, event.step) > (int(held.get("epoch") or 0), int(held.get("step") or 0))


async def apply_event(*, session: AsyncSession, event: training.TrainingEvent) -> tuple[TrainingRun, ModelEntry] | None:
    """Writes a trainer's event into its run and commits; when the run ended well, the run and the
    entry to register, uncommitted (the caller registers it, audited, which commits both). An
    event of an unknown run, or of one that ended already, changes nothing; nor does a progress
    event behind what the run holds (``_progressed``)."""
    run = await session.get(TrainingRun, uuid.UUID(event.run_id), with_for_update=True)
    if run is None or run.status not in UNFINISHED:
        await session.rollback()
        return None
    now = datetime.now(UTC)
    if event.kind == "started":
        run.status, run.started_at, run.trainer = "running", now, event.trainer
    elif event.kind == "epoch":
        run.status = "running"
        # Events come at least once (an acknowledgement lost after this commit delivers the
        # event again): an epoch the history has already is not counted twice.
        if all(int(entry.get("epoch") or 0) != event.epoch for entry in run.history):
            # Any: a number that was not finite is None (JSONB holds no NaN), which the column's
            # annotation does not say.
            numbers: dict[str, Any] = dict(event.numbers)
            run.history = [*run.history, numbers]
        if run.progress is not None and int(run.progress.get("epoch") or 0) <= event.epoch:
            run.progress = None  # that epoch is in the history now
    elif event.kind == "progress":
        run.status = "running"
        if _progressed(run, event):
            seconds = event.numbers.get("seconds")
            run.progress = {"epoch": event.epoch, "step": event.step, "steps": event.steps, "seconds": seconds}
    elif event.kind == "done":
        run.status, run.finished_at, run.record = "done", now, event.record
        base = await base_entry(session=session, name=run.model_name, base_version=run.base_version)
        # Not committed here: the caller registers the version in the same transaction, so a run
        # reads done only once its version is in the registry.
        return run, trained_entry(run, base)
    else:
        run.status, run.finished_at, run.error = event.kind, now, event.error
    await session.commit()
    return None


TRAINER_STOPPED = "the trainer stopped during the run (killed, crashed or its machine lost)"
END_NOT_RECORDED = (
    "the trainer ended the run, but its end never reached the portal (the trainer stopped before "
    "reporting it, or the report was lost); start the run again"
)
END_GRACE_S = 60.0
"""How long after a trainer set a run's ``ended_key`` its report is waited for in any case:
far longer than the moment between that key and the report's XADD."""


async def _end_on_its_way(redis: Redis, run_id: str) -> bool:
    """Whether the end the trainer reported (``ended_key``) may still reach the run: it was set
    less than END_GRACE_S ago (or without a TTL, its age unknown), or the API's consumer group
    still has training events to read or to acknowledge."""
    ttl = await redis.ttl(training.ended_key(run_id))
    if ttl < 0 or training.ENDED_TTL_S - ttl < END_GRACE_S:
        return True
    if not await redis.exists(training.EVENT_STREAM):
        return False  # the trainer stopped before its first report reached Redis
    for group in await redis.xinfo_groups(training.EVENT_STREAM):
        name = group["name"].decode() if isinstance(group["name"], bytes) else group["name"]
        if name == training.EVENT_GROUP:
            return bool(group.get("pending") or group.get("lag"))
    return True  # no group yet: no API process has read the stream


async def fail_stale(*, session: AsyncSession, redis: Redis) -> int:
    """Fails running runs whose trainer stopped holding their liveness key (killed, crashed, its
    machine gone: the key missing twice, a renewal's interval apart), and those whose reported end
    never reached them (``_end_on_its_way``); how many."""
    cutoff = datetime.now(UTC) - timedelta(seconds=training.ALIVE_TTL_S)
    running = list(
        await session.scalars(
            select(TrainingRun.id).where(TrainingRun.status == "running", TrainingRun.started_at < cutoff)
        )
    )
    await session.commit()  # no transaction held over the Redis checks
    keyless = [run_id for run_id in running if not await redis.exists(training.alive_key(str(run_id)))]
    if keyless:
        # A Redis restarted without persistence has lost every key: a live trainer sets its run's
        # again at its next renewal, every third of the key's lifetime. Looked at again after that.
        await asyncio.sleep(training.ALIVE_TTL_S / 3 + 1)
    failed = 0
    for run_id in keyless:
        if await redis.exists(training.alive_key(str(run_id))):
            continue  # still training
        error = TRAINER_STOPPED
        if await redis.exists(training.ended_key(str(run_id))):
            if await _end_on_its_way(redis, str(run_id)):
                continue
            error = END_NOT_RECORDED
        # Only if still running: its end may have been applied since it was read (an API back
        # from an outage reads the end while this check runs).
        changed = await session.execute(
            update(TrainingRun)
            .where(TrainingRun.id == run_id, TrainingRun.status == "running")
            .values(status="failed", finished_at=datetime.now(UTC), error=error)
        )
        failed += cast(CursorResult[Any], changed).rowcount
        await session.commit()
        if error == TRAINER_STOPPED:
            # A trainer that lost its liveness key but lives on (Redis out of its reach longer
            # than the key's lifetime) stops at its next check and leaves nothing of the version,
            # as at a cancel, instead of finishing a model no run will register.
            with contextlib.suppress(*REDIS_ERRORS):
                await redis.set(training.cancel_key(str(run_id)), "1", ex=7 * 86400)
    return failed


async def fail_unrecorded(*, session: AsyncSession, run_id: uuid.UUID, reason: str) -> bool:
    """Fails a run still queued or running whose trainer's event could not be applied (a bug, not
    an outage), with ``reason``: left as it was, it would read running for good and hold up every
    other run of its model. Whether it was failed. Commits."""
    run = await session.get(TrainingRun, run_id, with_for_update=True, populate_existing=True)
    if run is None or run.status not in UNFINISHED:
        await session.rollback()
        return False
    run.status, run.finished_at, run.error = "failed", datetime.now(UTC), reason
    await session.commit()
    return True


LOST_AFTER = timedelta(seconds=60)
"""How long a queued run may be without its job waiting in ``training:jobs`` before it is failed:
far longer than the moment between its row's commit and the job's XADD."""
LOST_JOB = (
    "its job was lost before a trainer began it (Redis lost its data, or the trainer that took it "
    "stopped first); start the run again"
)


async def _waiting_jobs(redis: Redis) -> set[str]:
    """The run ids of the jobs in ``training:jobs`` that no trainer has read yet (after the
    trainers' group's last delivered entry; all of them before any trainer made the group)."""
    if not await redis.exists(training.JOB_STREAM):
        return set()
    groups = await redis.xinfo_groups(training.JOB_STREAM)
    last = next(
        (g["last-delivered-id"] for g in groups if g["name"] in (training.JOB_GROUP, training.JOB_GROUP.encode())),
        None,
    )
    start = "-" if last is None else f"({last.decode() if isinstance(last, bytes) else last}"
    waiting: set[str] = set()
    for _entry_id, fields in cast(
        list[tuple[Any, dict[Any, Any]]], await redis.xrange(training.JOB_STREAM, start, "+")
    ):
        meta = fields.get(b"meta", fields.get("meta"))
        with contextlib.suppress(KeyError, ValueError, TypeError):
            waiting.add(str(json.loads(cast(bytes, meta))["run_id"]))
    return waiting


async def fail_lost(*, session: AsyncSession, redis: Redis) -> int:
    """Fails the runs queued for over ``LOST_AFTER`` whose job no trainer can read any more: it is
    neither waiting in the stream nor was it begun (a trainer says ``started`` first), so the run
    would stay queued and block every run of its model. How many."""
    cutoff = datetime.now(UTC) - LOST_AFTER
    queued = list(
        await session.scalars(
            select(TrainingRun).where(TrainingRun.status == "queued", TrainingRun.created_at < cutoff)
        )
    )
    if not queued:
        return 0
    waiting = await _waiting_jobs(redis)
    failed = 0
    for run in queued:
        if str(run.id) not in waiting:
            run.status, run.finished_at, run.error = "failed", datetime.now(UTC), LOST_JOB
            failed += 1
    await session.commit()
    return failed


EXPORT_GRACE_SECONDS = 3600.0
"""A run's export folder without a row is left this long: its run may be exporting it now."""


def _export_folders(data_dir: Path, older_than: float) -> tuple[dict[uuid.UUID, Path], set[uuid.UUID]]:
    """The run export folders under ``data_dir`` by run id, and which of them were last changed
    before ``older_than`` (a Unix time). Other entries are not the portal's and are left."""
    folders: dict[uuid.UUID, Path] = {}
    old: set[uuid.UUID] = set()
    if not data_dir.is_dir():
        return folders, old
    for path in data_dir.iterdir():
        try:
            run_id = uuid.UUID(path.name)
            changed = path.lstat().st_mtime
        except (ValueError, OSError):
            continue
        # Only what create_run makes: a folder (no link) named by the run id as str() spells it.
        if str(run_id) == path.name and path.is_dir() and not path.is_symlink():
            folders[run_id] = path
            if changed < older_than:
                old.add(run_id)
    return folders, old


async def remove_exports(*, session: AsyncSession, data_dir: Path, grace_seconds: float = EXPORT_GRACE_SECONDS) -> int:
    """Removes the feedback export folders (``data_dir/<run id>``) of runs that ended (done, failed
    or cancelled: their trainer has read them) and, past ``grace_seconds``, those no run names (a
    database reset, a process that died exporting); how many were removed (one that could not be
    is tried again at the next call). What a run trained on stays in its row (``examples``) and its
    training record, so exports do not pile up with every retraining."""
    folders, old = await to_thread.run_sync(_export_folders, data_dir, time.time() - grace_seconds)
    if not folders:
        return 0
    rows = await session.execute(select(TrainingRun.id, TrainingRun.status).where(TrainingRun.id.in_(list(folders))))
    statuses = {run_id: status for run_id, status in rows}
    ended = [
        folders[run_id]
        for run_id in folders
        if (run_id in statuses and statuses[run_id] not in UNFINISHED) or (run_id not in statuses and run_id in old)
    ]
    removed = 0
    for path in ended:
        await to_thread.run_sync(functools.partial(shutil.rmtree, path, ignore_errors=True))
        removed += not path.exists()
    return removed


async def new_examples_since_last_run(
    *, session: AsyncSession, name: str, categories: Sequence[str] | None = None
) -> int:
    """Labelled ``train`` examples (image contents) of model ``name`` labelled since its latest
    run that ended done, or is still queued or running, was queued (all of them when there is
    none); with ``categories``, only those labelled one of them (what a run from the version
    with those labels can learn: it skips the others). A run that failed or was cancelled
    trained nothing: the examples it exported are still new, and the trigger starts another run
    for them (``retry_refusal`` says when)."""
    since = await session.scalar(
        select(func.max(TrainingRun.created_at)).where(
            TrainingRun.model_name == name, TrainingRun.status.in_(("done", *UNFINISHED))
        )
    )
    query = select(func.count(LabelledExample.sha256.distinct())).where(
        LabelledExample.model_name == name, LabelledExample.split == "train"
    )
    if categories is not None:
        query = query.where(LabelledExample.label.in_(list(categories)))
    if since is not None:
        query = query.where(LabelledExample.updated_at > since)
    return int(await session.scalar(query) or 0)


RETRY_AFTER = timedelta(hours=1)
"""How long the trigger waits after a model's run failed or was cancelled before it starts another
for the same examples; doubled for each further one since the model's latest run that ended done
(``retry_refusal``)."""
RETRY_AFTER_MAX = timedelta(days=1)
"""The longest the trigger waits between runs of a model that fail every time."""


async def retry_refusal(*, session: AsyncSession, name: str, now: datetime | None = None) -> str | None:
    """Why the retraining trigger does not start a run of ``name`` at ``now`` (default: the
    present), or None when it may: runs the trigger started failed or were cancelled since the
    model's latest run that ended done, and the latest of them ended less than ``RETRY_AFTER``
    ago, doubled for each one before it (1 h, 2 h, 4 h ... up to ``RETRY_AFTER_MAX``). A run that
    fails every time (a trainer killed by the machine's memory limit, a TRAINING_DATA_DIR it
    cannot read) is then tried a few times a day at most, not at every check; an admin may start
    one at any time. An admin's runs (their own options and base) and runs whose trainer was told
    to stop (``training.STOPPED``: a deploy, a restart) say nothing of the trigger's next run and
    are not counted."""
    now = now or datetime.now(UTC)
    last_done = await session.scalar(
        select(func.max(TrainingRun.created_at)).where(TrainingRun.model_name == name, TrainingRun.status == "done")
    )
    ended = func.coalesce(TrainingRun.finished_at, TrainingRun.created_at)
    where = [
        TrainingRun.model_name == name,
        TrainingRun.trigger == "auto",
        or_(
            TrainingRun.status == "cancelled",
            and_(TrainingRun.status == "failed", func.coalesce(TrainingRun.error, "") != training.STOPPED),
        ),
    ]
    if last_done is not None:
        where.append(TrainingRun.created_at > last_done)
    failures = int(await session.scalar(select(func.count()).select_from(TrainingRun).where(*where)) or 0)
    if not failures:
        return None
    run_id, status, at = (
        await session.execute(
            select(TrainingRun.id, TrainingRun.status, ended)
            .where(*where)
            .order_by(TrainingRun.created_at.desc(), TrainingRun.id.desc())
            .limit(1)
        )
    ).one()
    at = at.astimezone(UTC)
    retry_at = at + min(RETRY_AFTER * 2 ** min(failures - 1, 16), RETRY_AFTER_MAX)
    if retry_at <= now:
        return None
    in_a_row = f" ({failures} runs in a row failed or were cancelled)" if failures > 1 else ""
    return (
        f"its run {run_id} {status} at {at:%Y-%m-%d %H:%M:%S} UTC{in_a_row}; the next starts from "
        f"{retry_at:%Y-%m-%d %H:%M:%S} UTC (an admin may start one at any time)"
    )
