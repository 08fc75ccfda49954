"""A real ``postlane serve`` per test module, on SQLite and on PostgreSQL.

Each module gets a fresh database (``module_database_url``), a settings file
with four listeners on free loopback ports, the tenants the tests need and a
running server; at the end the server is stopped with SIGTERM and must exit
0 after printing ``postlane stopped``. A module changes its server by
overriding the ``server_config`` fixture.

Tenants every server has: account ``acme`` with sending domain ``acme.com``
(return path ``bounce.acme.com``) and SMTP user ``app1`` (its password is
``server.passwords["app1"]``).
"""

from __future__ import annotations

import signal
from collections.abc import Generator, Iterator

import pluggy
import pytest

from integration.harness import PostlaneServer, ServerConfig


@pytest.fixture(scope="module")
def server_config() -> ServerConfig:
    """Override in a module to change limits or to add tenants."""
    return ServerConfig()


@pytest.fixture(scope="module")
def server(
    module_database_url: str,
    server_config: ServerConfig,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[PostlaneServer]:
    instance = PostlaneServer(
        tmp_path_factory.mktemp("postlane"), module_database_url, server_config
    )
    try:
        # What an operator does first on PostgreSQL (on SQLite serve would also do it).
        instance.cli("db", "upgrade")
        instance.add_account("acme", "acme.com")
        instance.add_user("acme", "app1")
        if server_config.prepare is not None:
            server_config.prepare(instance)
        instance.start()
        yield instance
        if instance.running:
            code, out = instance.stop(signal.SIGTERM)
            assert code == 0, instance.describe()
            assert out.splitlines()[-1:] == ["postlane stopped"], instance.describe()
    finally:
        if instance.running:
            instance.kill()
        instance.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pluggy.Result[pytest.TestReport], None]:
    """A failed test's report shows what its server printed and logged."""
    outcome = yield
    report = outcome.get_result()
    instance = getattr(item, "funcargs", {}).get("server")
    if report.failed and isinstance(instance, PostlaneServer):
        report.sections.append(("postlane serve", instance.describe()))
