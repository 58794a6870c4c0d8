"""The profile summary counts busy samples only, by the portal's functions and by library."""

from __future__ import annotations

from pathlib import Path

from bench.profile import summarise

STACKS = """\
process 1:"python -m api";Runner.run (asyncio/runners.py:118) 50
process 1:"python -m api";Thread._bootstrap (threading.py:1002);Condition.wait (threading.py:327) 40
process 1:"python -m api";main (api/__main__.py:9);predict (api/app/predictions/router.py:130);\
admit (api/app/predictions/service.py:140);PreparedStatement.__do_execute (asyncpg/prepared_stmt.py:257) 6
process 1:"python -m api";main (api/__main__.py:9);predict (api/app/predictions/router.py:130);\
enqueue (api/app/predictions/queue.py:50);Redis.execute_command (redis/asyncio/client.py:600) 3
process 1:"python -m api";main (api/__main__.py:9);predict (api/app/predictions/router.py:131) 1
"""


def test_idle_samples_are_left_out_and_shares_add_up(tmp_path: Path) -> None:
    stacks = tmp_path / "profile-api.txt"
    stacks.write_text(STACKS)
    text = summarise(stacks)
    assert text.startswith("10 busy samples.")
    assert "| `predict (api/app/predictions/router.py)` | 100.0 % |" in text
    assert "| `admit (api/app/predictions/service.py)` | 60.0 % |" in text
    assert "| SQLAlchemy and asyncpg | 60.0 % |" in text
    assert "| redis-py | 30.0 % |" in text
    assert "| the portal's code | 10.0 % |" in text
    assert "api/__main__.py" not in text
