"""store_answer(): a worker's answer stored, its job completed and the job's answers returned in
one round trip

Revision ID: a4d1c7e93b26
Revises: c7e4a1b9d305
Create Date: 2026-12-02 12:00:00.000000+00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "a4d1c7e93b26"
down_revision: str | None = "c7e4a1b9d305"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# PL/pgSQL so that each statement takes its own snapshot (the function is VOLATILE; under READ
# COMMITTED each statement in it sees what was committed before it started): the UPDATE of the
# prediction runs once the job's row lock is granted, and so sees a job another transaction
# queued and committed while this one waited for the lock. The answers are built as
# api.app.predictions.schemas.PredictionPublic is, in the job's order of models.
STORE_ANSWER = """
CREATE FUNCTION store_answer(
    p_job_id uuid, p_prediction_id uuid, p_status text, p_label text, p_score double precision,
    p_top_k jsonb, p_error text, p_random_weights boolean, p_worker_id text,
    p_queue_ms double precision, p_preprocess_ms double precision, p_inference_ms double precision,
    p_total_ms double precision, p_batch_size integer
) RETURNS TABLE (owner_id integer, answers text) LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_statuses text[];
    v_status text;
BEGIN
    PERFORM 1 FROM jobs WHERE jobs.id = p_job_id FOR UPDATE;
    UPDATE predictions AS p SET
        status = p_status, label = p_label, score = p_score, top_k = p_top_k, error = p_error,
        random_weights = p_random_weights, worker_id = p_worker_id, queue_ms = p_queue_ms,
        preprocess_ms = p_preprocess_ms, inference_ms = p_inference_ms, total_ms = p_total_ms,
        batch_size = p_batch_size, finished_at = now()
    WHERE p.id = p_prediction_id AND p.job_id = p_job_id AND p.status IN ('queued', 'running')
    RETURNING (SELECT j.owner_id FROM jobs j WHERE j.id = p.job_id) INTO owner_id;
    IF NOT FOUND THEN
        RETURN;  -- a duplicate answer, or its job was deleted: nothing changed
    END IF;
    SELECT array_agg(p.status) INTO v_statuses FROM predictions p WHERE p.job_id = p_job_id;
    IF 'queued' = ANY(v_statuses) OR 'running' = ANY(v_statuses) THEN
        RETURN NEXT;  -- answers is NULL: the job waits for its other models
        RETURN;
    END IF;
    v_status := CASE
        WHEN 'done' = ANY(v_statuses) THEN 'done'
        WHEN 'failed' = ANY(v_statuses) THEN 'failed'
        WHEN 'cancelled' = ANY(v_statuses) THEN 'cancelled'
        ELSE 'expired'
    END;
    UPDATE jobs SET status = v_status, finished_at = now()
    WHERE jobs.id = p_job_id AND jobs.status IN ('queued', 'running');
    IF FOUND THEN
        SELECT json_agg(json_build_object(
            'id', p.id, 'model', p.model_name, 'version', p.model_version, 'status', p.status,
            'label', p.label, 'score', p.score,
            'top_k', coalesce(nullif(p.top_k, 'null'::jsonb), '[]'::jsonb), 'cached', p.cached,
            'random_weights', p.random_weights, 'error', p.error,
            'timings', json_build_object(
                'queue_ms', p.queue_ms, 'preprocess_ms', p.preprocess_ms, 'inference_ms', p.inference_ms,
                'total_ms', p.total_ms, 'batch_size', p.batch_size
            )
        ) ORDER BY p.position)::text INTO answers
        FROM predictions p WHERE p.job_id = p_job_id;
    END IF;
    RETURN NEXT;
END
$$
"""


def upgrade() -> None:
    op.execute(STORE_ANSWER)


def downgrade() -> None:
    op.execute("DROP FUNCTION store_answer")
