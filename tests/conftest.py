"""Test settings shared by every test module.

The suite runs tiny models on a 2-core machine, sometimes several processes at once (shared
studies): one intra-op thread per process avoids OpenMP oversubscription, which made a tiny
convolution many times slower with 2 threads while another process was busy.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by worker subprocesses

import torch  # noqa: E402

torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _cache_folder(tmp_path_factory, monkeypatch):
    """Streamed datasets and large temporary image sets go to a throwaway folder, never to the
    user's ~/.cache."""
    monkeypatch.setenv("ORDERSEARCH_CACHE", str(tmp_path_factory.mktemp("cache")))


def _mapped_file(t: torch.Tensor) -> str | None:
    """The file whose memory map holds ``t``'s data, or None when it is in anonymous memory."""
    ptr = t.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, _, _, _, inode, *path = line.split(maxsplit=5)
        lo, hi = (int(v, 16) for v in span.split("-"))
        if lo <= ptr < hi:
            return path[0] if path and inode != "0" else None
    return None


@pytest.fixture
def mapped_file():
    """``mapped_file(t)``: the file a tensor's data is memory-mapped from (None: in memory)."""
    return _mapped_file


# --- PostgreSQL -------------------------------------------------------------------------------
# Shared-study tests run against a real PostgreSQL, managed by pytest-postgresql: each test gets
# a fresh database (DatabaseJanitor creates and drops it). The server is the one named by
# ORDERSEARCH_TEST_POSTGRES_URL (.ci/run starts Debian's cluster and sets it: PostgreSQL refuses
# to run as root, which CI is); without it, a non-root user with Debian's `postgresql` installed
# gets a throwaway server on loopback started by pytest-postgresql itself.
import getpass  # noqa: E402
import glob  # noqa: E402
import shutil  # noqa: E402
import uuid  # noqa: E402
from urllib.parse import urlsplit  # noqa: E402

_PG_URL = os.environ.get("ORDERSEARCH_TEST_POSTGRES_URL")
_PG_CTL = shutil.which("pg_ctl") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))[-1:]), None)
_PG_SKIP: str | None = None
try:
    from pytest_postgresql import factories
    from pytest_postgresql.janitor import DatabaseJanitor
except ImportError:
    _PG_SKIP = "pytest-postgresql is not installed (make test installs it)"
else:
    if _PG_URL:
        _u = urlsplit(_PG_URL)
        postgresql_server = factories.postgresql_noproc(host=_u.hostname, port=_u.port or 5432, user=_u.username,
                                                        password=_u.password)
    elif _PG_CTL and os.geteuid() != 0:
        postgresql_server = factories.postgresql_proc(executable=_PG_CTL, host="127.0.0.1", port=None,
                                                      user=getpass.getuser())
    else:
        _PG_SKIP = ("no PostgreSQL: set ORDERSEARCH_TEST_POSTGRES_URL (as .ci/run does), or install Debian's "
                    "postgresql and run the tests as a user other than root")


@pytest.fixture
def postgres_url(request: pytest.FixtureRequest):  # -> Iterator[str]
    """The SQLAlchemy URL of a fresh, empty PostgreSQL database (dropped after the test)."""
    if _PG_SKIP:
        pytest.skip(_PG_SKIP)
    server = request.getfixturevalue("postgresql_server")
    dbname = f"ordersearch_{uuid.uuid4().hex[:10]}"
    with DatabaseJanitor(user=server.user, host=server.host, port=server.port, dbname=dbname,
                         password=server.password or None):
        auth = server.user + (f":{server.password}" if server.password else "")
        yield f"postgresql+psycopg://{auth}@{server.host}:{server.port}/{dbname}"
