"""Plain ``postlane serve``: delivery runs in a child process the first one supervises.

The same end-to-end path as test_end_to_end.py (SMTP in, smtp-sink as the
MX), with ``serve`` given no ``--role``: the first process runs intake and
starts ``serve --role delivery --no-metrics`` beside itself.
"""

from __future__ import annotations

import os
import signal

import pytest

from dnsserver import DnsServer
from integration.harness import PostlaneServer, ServerConfig, role_children, wait_for

from .test_end_to_end import dns, mx_port
from .test_end_to_end import test_accepted_message_is_delivered_to_the_mx as send_and_check

__all__ = ["dns", "mx_port"]  # module fixtures, shared with test_end_to_end.py


@pytest.fixture(scope="module")
def server_config(dns: DnsServer, mx_port: int) -> ServerConfig:
    return ServerConfig(
        roles=(),
        extra_toml=(
            f'\n[delivery]\nnameservers = ["{dns.nameserver}"]\nmx_port = {mx_port}\n'
            "allow_internal_mx = true\n"
            "poll_interval = 0.1\n"
        ),
    )


def test_accepted_message_is_delivered_by_the_delivery_process(server: PostlaneServer) -> None:
    assert "delivery (own process)" in server.stdout
    send_and_check(server)


def test_plain_serve_supervises_its_delivery_process(server: PostlaneServer) -> None:
    assert server.process is not None
    pid = server.process.pid
    (child,) = wait_for(lambda: role_children(pid, "delivery") or None, timeout=10)
    os.kill(child, signal.SIGKILL)  # a crash: the first process starts another
    (again,) = wait_for(
        lambda: [c for c in role_children(pid, "delivery") if c != child] or None, timeout=15
    )
    assert again != child
    send_and_check(server)  # the new one delivers


def test_stopping_serve_stops_its_delivery_and_commit_processes(server: PostlaneServer) -> None:
    assert server.process is not None
    pid = server.process.pid
    (delivery,) = wait_for(lambda: role_children(pid, "delivery") or None, timeout=10)
    (commit,) = wait_for(lambda: role_children(pid, "commit") or None, timeout=10)
    server.send_signal(signal.SIGTERM)
    server.process.wait(timeout=60)
    for child in (delivery, commit):
        assert not os.path.exists(f"/proc/{child}") or _zombie(child)


def _zombie(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as handle:
        return handle.read().rsplit(")", 1)[1].split()[0] == "Z"
