from tests.model.conftest import model_settings, registry  # noqa: F401 - the same fixtures
