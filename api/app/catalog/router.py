from __future__ import annotations

from fastapi import APIRouter

from api.app.catalog.schemas import ModelPublic, ModelsPublic
from api.app.catalog.service import NOT_SERVED, default_entry, listed_entries, model_labels
from api.app.core.responses import AUTHED, INVALID
from api.app.deps import CurrentUser, RedisDep, RegistryDep, SettingsDep, WorkersDep

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
                explainable=registry.keras_twin(entry.key) is not None,
            )
        )
    return ModelsPublic(data=data, default=default.key if default else None)
