"""Schema migrations of the prediction log (Alembic), run by the server at start.

Several replicas may start at once against one PostgreSQL: the upgrade holds a PostgreSQL advisory lock
(an exclusive file lock beside an SQLite file), so exactly one migrates and the others find the schema
current. A database whose revision this server does not know (written by a newer uqserve) is refused with a
clear error instead of being touched.
"""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, Engine, text

from service.predlog.records import PredictionLogError

log = logging.getLogger("uqserve.predlog")
_ADVISORY_LOCK = 0x75717365  # "uqse"


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


@contextmanager
def _exclusive(engine: Engine) -> Iterator[Connection]:
    if engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:"):
        lock_path = Path(f"{engine.url.database}.migrate-lock")
        with lock_path.open("w") as lock, engine.connect() as connection:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield connection
        return
    with engine.connect() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _ADVISORY_LOCK})
            connection.commit()
        try:
            yield connection
        finally:
            if engine.dialect.name == "postgresql":
                connection.rollback()
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _ADVISORY_LOCK})
                connection.commit()


def upgrade(engine: Engine, revision: str = "head") -> str:
    """Bring the database to ``revision`` (default: this server's newest); returns the revision it is at."""
    config = alembic_config()
    script = ScriptDirectory.from_config(config)
    with _exclusive(engine) as connection:
        current = current_revision(connection)
        connection.rollback()
        try:
            if current is not None:
                script.get_revision(current)
        except CommandError:
            raise PredictionLogError(
                f"the prediction log at {engine.url.render_as_string(hide_password=True)} is at schema revision "
                f"{current!r}, which this server does not know (its newest is {head_revision()!r}): it was "
                "written by a newer uqserve; upgrade this server or point UQSERVE_DATABASE_URL elsewhere") from None
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
        connection.commit()
        now = current_revision(connection)
        connection.rollback()
    if now != current:
        log.info("prediction log schema upgraded from %s to %s", current or "empty", now)
    return now or ""
