"""The migrations build exactly the schema the models describe."""

from __future__ import annotations

from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from api.app.core.db import Base

pytestmark = pytest.mark.usefixtures("client")  # the app's lifespan has opened its engine


async def test_migrated_database_matches_the_models(app: Any) -> None:
    async with app.state.sessionmaker() as session:
        connection = await session.connection()
        diff = await connection.run_sync(lambda sync: compare_metadata(MigrationContext.configure(sync), Base.metadata))
    assert diff == []
