"""The PostgreSQL the store's tests run against keeps serving whatever it logs."""

from __future__ import annotations

import threading

import pytest

from tests.helpers.postgres import Postgres


def test_a_server_that_logs_much_keeps_answering(postgres: Postgres) -> None:
    """Every refused statement is an ERROR in the server's log. The fixture piped the server's
    stderr and nobody read it: some 64 KiB of errors (round 17's refused rows made about 190)
    filled the pipe, and the server stalled in its write, every session with it. The log goes
    to a file now."""
    import psycopg  # noqa: PLC0415 (the store's optional driver)
    from psycopg import sql  # noqa: PLC0415

    done = threading.Event()
    failures: list[BaseException] = []

    def refused_statements() -> None:
        try:
            with psycopg.connect(postgres.url, autocommit=True) as conn:
                for i in range(1500):
                    with pytest.raises(psycopg.errors.UndefinedTable):
                        name = sql.Identifier(f"no_such_table_{i:04d}_{'x' * 40}")
                        conn.execute(sql.SQL("SELECT * FROM {}").format(name))
                assert conn.execute("SELECT 1").fetchone() == (1,)
        except BaseException as exc:  # reported below, in the test's thread
            failures.append(exc)
        finally:
            done.set()

    worker = threading.Thread(target=refused_statements, daemon=True)
    worker.start()
    assert done.wait(60), "the server stopped answering while it logged"
    assert failures == []
    assert "no_such_table_1499" in postgres.log_text()
