"""Developer tool: regenerate the initial migration from flywheel/store/schema.py.

Until the first release the schema lives in one migration, 0001. After a release, add new revisions
with `alembic revision --autogenerate` instead of running this.
"""

import tempfile
from pathlib import Path

from alembic import command

from flywheel.store.db import MIGRATIONS, alembic_config

for old in (MIGRATIONS / "versions").glob("0001_*.py"):
    old.unlink()
with tempfile.TemporaryDirectory() as tmp:
    cfg = alembic_config(f"sqlite:///{Path(tmp) / 'empty.db'}")
    command.revision(cfg, message="initial schema", autogenerate=True, rev_id="0001")
