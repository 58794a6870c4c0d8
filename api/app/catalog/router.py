from __future__ import annotations

from fastapi import APIRouter, HTTPException

from api.app.catalog.schemas import ModelLabels, ModelPublic, ModelsPublic
from api.app.catalog.service import NOT_SERVED, default_entry, listed_entries, model_labels
from api.app.core.responses import AUTHED, INVALID, error
from api.app.deps import CurrentUser, ReadSessionDep, RedisDep, RegistryDep, SettingsDep, WorkersDep
from contracts.registry import parse_model_ref

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=ModelsPublic, responses={**AUTHED, **INVALID})
async def list_models(
    user: CurrentUser,
    redis: RedisDep,
    workers: WorkersDep,
    registry: RegistryDep,
    settings: SettingsDep,
    labels: bool = True,
) -> ModelsPublic:
    """Every model version, whether it is available (and why not) and how many workers serve it."""
    availability = await workers.availability()
    default = default_entry(registry, availability, benchmark_mode=settings.benchmark_mode)
    data = []
    for entry in listed_entries(registry, benchmark_mode=settings.benchmark_mode):
        state = availability.get(entry.key)
        names = await model_labels(redis, entry)
        data.append(
            ModelPublic(
                name=entry.name,
                version=entry.version,
                ref=entry.key,
                display_name=entry.display_name or entry.key,
                channel=entry.channel,
                description=entry.description,
                runtime=entry.runtime.value,
                precision=entry.precision,
                input=entry.input,
                num_classes=len(names) if names else (state.num_classes if state else 0),
                labels=names if labels else None,
                available=bool(state and state.available),
                reason=(state.reason() if user.is_admin else state.public_reason()) if state else NOT_SERVED,
                workers=state.workers if state else 0,
                random_weights=entry.weights == "random",
                default=default is not None and default.key == entry.key,
            )
        )
    return ModelsPublic(data=data, default=default.key if default else None)


@router.get(
    "/{ref}/labels",
    response_model=ModelLabels,
    responses={**AUTHED, **INVALID, 404: error("No such version, or its labels are not known")},
)
async def version_labels(
    ref: str, _user: CurrentUser, redis: RedisDep, registry: RegistryDep, session: ReadSessionDep
) -> ModelLabels:
    """The labels of any version people's predictions can come from (``name@version``), the
    retired and disabled ones included, which ``GET /v1/models`` no longer lists: what a verdict
    on an old prediction may name as the right label. 404 for an unknown version (shadows are not
    made known to people) or one whose labels no worker has published yet."""
    try:
        name, version = parse_model_ref(ref)
    except ValueError as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from None
    entry = next((m for m in registry.models if m.name == name and m.version == version), None)
    if entry is None or entry.benchmark_only or entry.channel == "shadow":
        raise HTTPException(status_code=404, detail=f"Unknown model {ref!r}")
    labels = await model_labels(redis, entry, session=session)
    if labels is None:
        served = entry.enabled and entry.channel != "retired"
        why = "no worker has published them yet" if served else "it is not served any more"
        raise HTTPException(status_code=404, detail=f"The labels of {entry.key} are not known: {why}")
    return ModelLabels(ref=entry.key, labels=labels)
