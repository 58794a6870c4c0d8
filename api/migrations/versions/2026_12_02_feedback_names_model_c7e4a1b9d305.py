"""a verdict names the model version it judges even when written by a release that did not: the
database fills the names from the prediction, and fills in those written so far

Revision ID: c7e4a1b9d305
Revises: f3a9c2d81b57
Create Date: 2026-12-02 10:00:00.000000+00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "c7e4a1b9d305"
down_revision: str | None = "f3a9c2d81b57"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# During an upgrade the previous release's API processes still store verdicts without the model
# columns (added by a1f5c3e9d742); the statistics count only verdicts that name their model, so
# those would be left out for good. A BEFORE trigger names them from their prediction.
NAME_FROM_PREDICTION = """
CREATE FUNCTION feedback_names_its_model() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.model_name IS NULL AND NEW.prediction_id IS NOT NULL THEN
        SELECT p.model_name, p.model_version, p.label
        INTO NEW.model_name, NEW.model_version, NEW.predicted_label
        FROM predictions p WHERE p.id = NEW.prediction_id;
    END IF;
    RETURN NEW;
END
$$
"""


def upgrade() -> None:
    op.execute(NAME_FROM_PREDICTION)
    op.execute(
        "CREATE TRIGGER feedback_names_its_model BEFORE INSERT OR UPDATE ON feedback "
        "FOR EACH ROW EXECUTE FUNCTION feedback_names_its_model()"
    )
    # Those written without the names since a1f5c3e9d742: the statistics' update trigger counts them now.
    op.execute("""
        UPDATE feedback f SET model_name = p.model_name, model_version = p.model_version, predicted_label = p.label
        FROM predictions p WHERE f.model_name IS NULL AND f.prediction_id = p.id
        """)


def downgrade() -> None:
    op.execute("DROP TRIGGER feedback_names_its_model ON feedback")
    op.execute("DROP FUNCTION feedback_names_its_model()")
