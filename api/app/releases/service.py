"""Comparing a candidate version with the stable one before it is promoted: held-out accuracy
from the training records, accuracy from users' verdicts, and the traffic each answered (latency,
scores, agreement of a shadow with the answers it mirrored)."""

from __future__ import annotations

import uuid
from collections.abc import Collection
from datetime import UTC, datetime, timedelta

from fastapi import HTTPException
from sqlalchemy import Subquery, case, func, select, text, union_all
from sqlalchemy.ext.asyncio import AsyncSession

from api.app.catalog.service import NOT_SERVED, ModelAvailability
from api.app.feedback.models import Feedback
from api.app.images.models import Image
from api.app.predictions import evaluations
from api.app.predictions import service as predictions_service
from api.app.predictions.models import Evaluation, Job, Prediction, ShadowPrediction
from api.app.predictions.schemas import EvaluationPublic
from api.app.registry import service as registry_service
from api.app.registry.models import ModelVersion
from api.app.releases.schemas import Comparison, ServingVersion, VersionStats
from api.app.stats.models import VerdictStatDelta, VerdictStats

MIN_HELDOUT = 500
"""Fewer held-out drawings than this give no held-out comparison: 6 right out of 6 says little,
and at 500 a 95 % accuracy is known to within about ±2 points (95 % binomial interval)."""

MIN_FEEDBACK = 20
"""Fewer verdicts than this give no feedback accuracy: two wrong answers out of five say little."""


async def _traffic(
    session: AsyncSession, name: str, version: int, since: datetime
) -> tuple[int, float | None, float | None, float | None]:
    """Answers of ``name@version`` since ``since``, to people and as a shadow's copies both: a
    version promoted out of shadow, or rolled back into it, keeps what it answered before."""
    answered = [
        select(table.total_ms.label("total_ms"), table.score.label("score")).where(
            table.model_name == name,
            table.model_version == version,
            table.status == "done",
            table.created_at >= since,
        )
        for table in (Prediction, ShadowPrediction)
    ]
    rows = union_all(*answered).subquery()
    row = (
        await session.execute(
            select(
                func.count(),
                func.percentile_cont(0.5).within_group(rows.c.total_ms),
                func.percentile_cont(0.95).within_group(rows.c.total_ms),
                func.avg(rows.c.score),
            )
        )
    ).one()
    count, p50, p95, score = row
    return int(count), _round(p50), _round(p95), _round(score, 4)


def _round(value: object, digits: int = 1) -> float | None:
    return round(float(value), digits) if isinstance(value, int | float) else None


def _verdicts(*, name: str | None = None, version: int | None = None) -> Subquery:
    """Users' verdicts (is_correct not null) per day, model version and outcome, as
    ``(model_name, model_version, is_correct, verdicts)`` rows, only of ``name@version`` when
    given: the summary plus the signed changes the feedback triggers recorded and the roll-up has
    not folded in yet (migration a1f5c3e9d742). Their sums equal a count over the current feedback
    rows at once: a verdict changed counts as its new outcome, one deleted (also with its
    prediction, image or user) no longer counts."""
    parts = []
    for table in (VerdictStats, VerdictStatDelta):
        part = select(table.model_name, table.model_version, table.is_correct, table.verdicts)
        if name is not None and version is not None:
            part = part.where(table.model_name == name, table.model_version == version)
        parts.append(part)
    return union_all(*parts).subquery()


async def _feedback(session: AsyncSession, name: str, version: int) -> tuple[int, float | None]:
    """How many verdicts users gave on ``name@version``'s answers, and the share saying correct
    (None below ``MIN_FEEDBACK``). Reads the verdict summaries (one statement, so a roll-up moving
    changes into the summary is seen either before or after, never counted twice): its cost
    follows the days and versions summarised, not the predictions or verdicts stored."""
    rows = _verdicts(name=name, version=version)
    count, correct = (
        await session.execute(
            select(
                func.coalesce(func.sum(rows.c.verdicts), 0),
                func.coalesce(func.sum(rows.c.verdicts).filter(rows.c.is_correct), 0),
            )
        )
    ).one()
    count = int(count)
    return count, (int(correct) / count) if count >= MIN_FEEDBACK else None


async def _stats(
    session: AsyncSession, row: ModelVersion, availability: dict[str, ModelAvailability], since: datetime
) -> VersionStats:
    answers, p50, p95, score = await _traffic(session, row.name, row.version, since)
    feedback, feedback_accuracy = await _feedback(session, row.name, row.version)
    state = availability.get(f"{row.name}@{row.version}")
    served = {key: s.num_classes for key, s in availability.items() if s.available}
    classes = registry_service.class_count(row, served)
    return VersionStats(
        version=row.version,
        channel=row.channel,
        heldout_accuracy=state.heldout_accuracy if state is not None else None,
        heldout_set=state.heldout_set if state is not None else None,
        heldout_size=state.heldout_size if state is not None else None,
        feedback=feedback,
        feedback_accuracy=feedback_accuracy,
        answers=answers,
        latency_p50_ms=p50,
        latency_p95_ms=p95,
        mean_score=score,
        classes=classes,
    )


async def compare(
    *,
    session: AsyncSession,
    name: str,
    candidate: int,
    baseline: int | None,
    availability: dict[str, ModelAvailability],
    margin: float,
    days: int,
) -> Comparison:
    """The candidate version against ``baseline`` (None: the model's stable version with the most
    traffic) over the last ``days``, with a verdict (``Comparison.verdict``). Raises 404 for an
    unknown model or version, 409 when there is no stable version to compare with or the
    candidate is it."""
    rows = {r.version: r for r in await session.scalars(select(ModelVersion).where(ModelVersion.name == name))}
    baseline = _baseline(name, rows, candidate, baseline)
    since = datetime.now(UTC) - timedelta(days=days)
    ours = await _stats(session, rows[candidate], availability, since)
    theirs = await _stats(session, rows[baseline], availability, since)

    copies = await predictions_service.shadow_agreement(
        session=session, since=since, name=name, mirrored_version=baseline
    )
    shadow_answers, agreeing = next(((n, a) for _, v, n, a in copies if v == candidate), (0, 0))
    agreement = round(int(agreeing or 0) / shadow_answers, 4) if shadow_answers else None

    evaluation = await evaluations.latest_finished(session=session, name=name, candidate=candidate, baseline=baseline)
    evaluated = await evaluations.summary(session=session, evaluation=evaluation) if evaluation is not None else None
    on_same_images: tuple[float | None, float | None] = (None, None)
    if evaluated is not None and min(evaluated.candidate.answered, evaluated.baseline.answered) >= MIN_FEEDBACK:
        on_same_images = (evaluated.candidate.accuracy, evaluated.baseline.accuracy)

    reasons: list[str] = []
    worse = False
    compared = 0
    # Held-out accuracies of a 6-class and a 20-class version come from different tasks: a 6-way
    # choice is easier, and its 96 % would pass for better than the 20-class version's 94 %.
    same_classes = True
    if ours.classes is not None and theirs.classes is not None and ours.classes != theirs.classes:
        same_classes = False
        reasons.append(
            f"held-out accuracy: not compared, {name}@{candidate} knows {ours.classes} classes and "
            f"{name}@{baseline} {theirs.classes}"
        )
        if ours.classes < theirs.classes:
            worse = True
            reasons.append(
                f"classes: {ours.classes} against {theirs.classes} (worse: people's pictures of the other "
                f"{theirs.classes - ours.classes} would get a wrong answer)"
            )
    heldout: tuple[float | None, float | None] = (None, None)
    if same_classes and ours.heldout_accuracy is not None and theirs.heldout_accuracy is not None:
        if why_not := _heldout_not_comparable(ours, theirs):
            reasons.append(f"held-out accuracy: not compared, {why_not}")
        else:
            heldout = (ours.heldout_accuracy, theirs.heldout_accuracy)
    for label, a, b in (
        ("held-out accuracy", *heldout),
        ("accuracy on the same labelled images", *on_same_images),
        ("accuracy on users' verdicts", ours.feedback_accuracy, theirs.feedback_accuracy),
    ):
        if a is None or b is None:
            continue
        verdict = "worse" if a < b - margin else "not worse"
        worse |= verdict == "worse"
        compared += 1
        # In percent, as people read accuracies: the margin is in points of them.
        reasons.append(f"{label}: {a * 100:.2f} % against {b * 100:.2f} % ({verdict}, margin {margin * 100:g} points)")
    return Comparison(
        model=name,
        candidate=ours,
        baseline=theirs,
        days=days,
        shadow_answers=shadow_answers,
        shadow_agreement=agreement,
        evaluation=evaluated,
        margin=margin,
        verdict="worse" if worse else ("not_worse" if compared else "no_evidence"),
        reasons=reasons,
    )


def _heldout_not_comparable(ours: VersionStats, theirs: VersionStats) -> str | None:
    """Why two held-out accuracies say nothing of one version against the other, if they do not:
    measured on different drawings (other categories, or drawings per category: a run trained on
    10 drawings per category is scored on 6 of them), or on fewer than ``MIN_HELDOUT``."""
    if ours.heldout_set is None or ours.heldout_set != theirs.heldout_set:
        return "they were measured on different held-out drawings"
    size = min(ours.heldout_size or 0, theirs.heldout_size or 0)
    if size < MIN_HELDOUT:
        return f"measured on {size} held-out drawings (fewer than {MIN_HELDOUT})"
    return None


async def serving(
    *, session: AsyncSession, availability: dict[str, ModelAvailability], shares: dict[tuple[str, int], float]
) -> list[ServingVersion]:
    """Every registered version with its state, the workers serving it, their memory, its
    held-out accuracy and users' verdicts on its answers: the verdicts in one grouped query of
    their summaries (``_verdicts``), whose cost follows days × versions, not the history."""
    rows = _verdicts()
    verdicts = {
        (name, version): (int(count), int(correct or 0))
        for name, version, count, correct in (
            await session.execute(
                select(
                    rows.c.model_name,
                    rows.c.model_version,
                    func.sum(rows.c.verdicts),
                    func.sum(rows.c.verdicts).filter(rows.c.is_correct),
                ).group_by(rows.c.model_name, rows.c.model_version)
            )
        )
    }
    result = []
    for row in await registry_service.list_versions(session=session):
        state = availability.get(f"{row.name}@{row.version}")
        count, correct = verdicts.get((row.name, row.version), (0, 0))
        result.append(
            ServingVersion(
                name=row.name,
                version=row.version,
                display_name=row.display_name,
                channel=row.channel,
                enabled=row.enabled,
                weight=row.weight,
                weight_share=round(shares.get((row.name, row.version), 0.0), 4),
                workers=state.workers if state else 0,
                memory_mib=state.memory_mib if state else None,
                unavailable_reason=None if _serves(row, state) else _why_not_served(row, state),
                heldout_accuracy=state.heldout_accuracy if state else None,
                feedback=count,
                feedback_accuracy=round(correct / count, 4) if count >= MIN_FEEDBACK else None,
            )
        )
    return result


async def labelled_images(
    *, session: AsyncSession, name: str, limit: int, labels: Collection[str] | None = None
) -> list[evaluations.LabelledImage]:
    """Images users gave a verdict on for model ``name`` (any version), each with the label the
    latest verdict gave it: the answer confirmed, or the right label of a "wrong"; the ``limit``
    most recent; with ``labels``, only those whose label is one of them."""
    truth = case((Feedback.is_correct.is_(True), Prediction.label), else_=Feedback.correct_label)
    latest = (
        select(Job.image_id, Image.sha256, truth.label("truth"), Feedback.created_at)
        .join(Prediction, Feedback.prediction_id == Prediction.id)
        .join(Job, Prediction.job_id == Job.id)
        .join(Image, Job.image_id == Image.id)
        .where(Prediction.model_name == name, Feedback.is_correct.is_not(None))
        .distinct(Job.image_id)
        .order_by(Job.image_id, Feedback.created_at.desc())
        .subquery()
    )
    rows = await session.execute(
        select(latest.c.image_id, latest.c.sha256, latest.c.truth)
        .where(latest.c.truth.is_not(None), *([latest.c.truth.in_(sorted(labels))] if labels is not None else []))
        .order_by(latest.c.created_at.desc())
        .limit(limit)
    )
    return [evaluations.LabelledImage(image_id, sha256, label) for image_id, sha256, label in rows]


def _serves(row: ModelVersion, state: ModelAvailability | None) -> bool:
    """Whether people's requests can reach the version now: enabled, not retired, and loaded by a
    live worker."""
    return row.enabled and row.channel != "retired" and state is not None and state.available


def _why_not_served(row: ModelVersion, state: ModelAvailability | None) -> str:
    if row.channel == "retired":
        return "it is retired (give it a channel again to serve it)"
    if not row.enabled:
        return "it is disabled: enable it and retry"
    return (state.reason() if state is not None else None) or NOT_SERVED


async def evaluate(
    *,
    session: AsyncSession,
    actor: registry_service.Actor,
    name: str,
    candidate: int,
    baseline: int | None,
    availability: dict[str, ModelAvailability],
    max_images: int,
) -> EvaluationPublic:
    """Starts running ``candidate`` and ``baseline`` (None: the stable version) on the same
    labelled images, at most ``max_images``; the reconciler queues them a few at a time. Raises
    404 for an unknown model or version, 409 when a version is not served by any worker, when
    it is the baseline itself, or when users gave no verdict on the model yet."""
    rows = {r.version: r for r in await session.scalars(select(ModelVersion).where(ModelVersion.name == name))}
    baseline = _baseline(name, rows, candidate, baseline)
    for version in (candidate, baseline):
        state = availability.get(f"{name}@{version}")
        if state is None or not state.available:
            raise HTTPException(
                status_code=409, detail=f"{name}@{version} cannot answer now: {_why_not_served(rows[version], state)}."
            )
    # One evaluation per pair at a time: concurrent requests take turns from here to the commit.
    await session.execute(
        text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"),
        {"key": f"evaluation:{name}@{candidate}:{baseline}"},
    )
    if (
        running := await evaluations.running_of(session=session, name=name, candidate=candidate, baseline=baseline)
    ) is not None:
        raise HTTPException(
            status_code=409,
            detail=f"An evaluation of {name}@{candidate} against @{baseline} is running ({running.id}).",
        )
    # Only images both versions could answer right: one labelled a category either lacks (a
    # version registered with other labels) would count against both and say nothing of either.
    known = [rows[version].labels for version in (candidate, baseline)]
    shared = set(known[0]) & set(known[1]) if known[0] is not None and known[1] is not None else None
    images = await labelled_images(session=session, name=name, limit=max_images, labels=shared)
    if not images:
        raise HTTPException(
            status_code=409,
            detail=f"Users have given no verdict on {name}'s answers yet"
            + (" with a label both versions know." if shared is not None else "."),
        )
    evaluation = await evaluations.start(
        session=session,
        name=name,
        candidate=candidate,
        baseline=baseline,
        images=images,
        requested_by=actor.email,
    )
    return await evaluations.summary(session=session, evaluation=evaluation)


async def evaluation(*, session: AsyncSession, name: str, evaluation_id: uuid.UUID) -> EvaluationPublic:
    """One evaluation of model ``name`` with its results so far; 404 when there is none."""
    found = await evaluations.get(session=session, name=name, evaluation_id=evaluation_id)
    if found is None:
        raise HTTPException(status_code=404, detail=f"{name} has no evaluation {evaluation_id}.")
    return await evaluations.summary(session=session, evaluation=found)


async def cancel_evaluation(*, session: AsyncSession, name: str, evaluation_id: uuid.UUID) -> EvaluationPublic:
    """Ends a running evaluation now; 404 when there is none, 409 when it ended."""
    found = await evaluations.get(session=session, name=name, evaluation_id=evaluation_id)
    if found is None:
        raise HTTPException(status_code=404, detail=f"{name} has no evaluation {evaluation_id}.")
    if found.status != "running":
        raise HTTPException(status_code=409, detail=f"The evaluation ended already ({found.status}).")
    await evaluations.cancel(session=session, evaluation=found)
    return await evaluations.summary(session=session, evaluation=found)


async def evaluations_of(*, session: AsyncSession, name: str) -> list[EvaluationPublic]:
    """The model's 20 most recent evaluations, newest first; 404 for an unknown model."""
    if await session.scalar(select(ModelVersion.id).where(ModelVersion.name == name).limit(1)) is None:
        raise HTTPException(status_code=404, detail=f"No model named {name!r}.")
    found: list[Evaluation] = await evaluations.listed(session=session, name=name)
    return [await evaluations.summary(session=session, evaluation=e) for e in found]


def _baseline(name: str, rows: dict[int, ModelVersion], candidate: int, baseline: int | None) -> int:
    if not rows:
        raise HTTPException(status_code=404, detail=f"No model named {name!r}.")
    if candidate not in rows:
        raise HTTPException(status_code=404, detail=f"{name} has no version {candidate}.")
    if baseline is None:
        if (stable := registry_service.main_stable(rows.values())) is None:
            raise HTTPException(
                status_code=409,
                detail=f"{name} has no enabled stable version to compare {name}@{candidate} with: name a baseline "
                "version (a model's first promotion is not compared).",
            )
        baseline = stable.version
    if baseline not in rows:
        raise HTTPException(status_code=404, detail=f"{name} has no version {baseline}.")
    if baseline == candidate:
        raise HTTPException(status_code=409, detail=f"{name}@{candidate} is the version it would be compared with.")
    return baseline


async def promote(
    *,
    session: AsyncSession,
    actor: registry_service.Actor,
    name: str,
    version: int,
    reason: str,
    force: bool,
    availability: dict[str, ModelAvailability],
    margin: float,
) -> registry_service.Changed:
    """``registry.service.promote`` behind the comparison: refused (409, with the numbers) when the
    candidate compares worse than the stable version by more than ``margin``, unless ``force``,
    whose override and numbers go into the audit trail with ``reason``. A version that is already
    one of several stable versions is not compared (it would be compared with itself): it becomes
    the only one. Nor is a model's first version to be promoted, when it has no enabled stable
    version (registered through the API, its versions all canaries): with nothing to compare with
    there is no evidence against it, so it needs no force, and the audit trail says it was not
    compared. It must still be loaded and healthy on a live worker, as any promotion."""
    stable = await registry_service.stable_versions(session=session, name=name)
    if not stable:  # or an unknown model: registry_service.promote answers 404
        reason = f"{reason} [not compared: {name} had no enabled stable version to compare with]"
    elif version not in stable:
        comparison = await compare(
            session=session,
            name=name,
            candidate=version,
            baseline=None,
            availability=availability,
            margin=margin,
            days=7,
        )
        if comparison.verdict == "worse":
            numbers = "; ".join(comparison.reasons)
            if not force:
                raise HTTPException(
                    status_code=409,
                    detail=f"{name}@{version} compares worse than the stable version: {numbers}. "
                    "Promote with force and a reason to go ahead.",
                )
            reason = f"{reason} [forced past the comparison: {numbers}]"
    return await registry_service.promote(
        session=session,
        actor=actor,
        name=name,
        version=version,
        reason=reason,
        available={key for key, state in availability.items() if state.available},
        reported=availability,
        compared_with=stable,
    )
