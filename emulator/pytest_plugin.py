"""pytest fixtures for lab tests (registered through the `pytest11` entry point).

    import pytest

    @pytest.mark.rpcauth_config({"policy": {"encryption_required": True}})   # optional
    def test_bob_cannot_open_alices_mailbox(rpcauth_lab):
        report = rpcauth_lab.client(logged_on="bob", binding_order=["ncacn_np"],
                                    mailbox="/o=Corp/ou=Site/cn=Recipients/cn=alice")
        assert report.status_name == "ecLoginPerm"

The marker takes a path to a lab YAML, a YAML string, a dict merged over the embedded KB lab,
or a LabConfig. Without it, `--rpcauth-config PATH` on the command line, else the KB lab.
"""

from __future__ import annotations

from typing import Any, Iterator

import pytest

from .config import LabConfig, coerce_config, default_config_with


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("rpcauth")
    group.addoption("--rpcauth-config", default=None, help="lab config (YAML) for the rpcauth_lab fixture")
    group.addoption("--rpcauth-captures", default=None, help="directory for the lab's per-connection pcaps")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "rpcauth_config(cfg): lab config for the rpcauth_lab fixture")


def _config_for(request: pytest.FixtureRequest) -> LabConfig:
    marker = request.node.get_closest_marker("rpcauth_config")
    if marker is not None and marker.args:
        value = marker.args[0]
        if isinstance(value, dict):
            return default_config_with(value)
        return coerce_config(value)
    return coerce_config(request.config.getoption("--rpcauth-config"))


class LabHandle:
    """The running lab plus a one-call synthetic client."""

    def __init__(self, lab: Any) -> None:
        self.lab = lab

    def __getattr__(self, name: str) -> Any:
        return getattr(self.lab, name)

    def client(self, *, mailbox: str, logged_on: str = "alice", binding_order=("ncacn_np", "ncacn_ip_tcp"),
               use_network_security: bool = False, typed: str | None = None, ipc_session: str | None = None,
               call: str = "EcDoConnect"):
        from .client.profile import Endpoint, Profile, lab_credentials as creds
        from .client.runner import run_client

        cfg = self.lab.config
        profile = Profile(mailbox_dn=mailbox, logged_on=creds(cfg, logged_on),
                          binding_order=tuple(binding_order), use_network_security=use_network_security,
                          prompt_answer=creds(cfg, typed), ipc_session=creds(cfg, ipc_session),
                          server=Endpoint(host=self.lab.host, smb_port=self.lab.ports.get("smb", 1),
                                          epm_port=self.lab.ports.get("epm", 1)),
                          connect_call=call, timeout=5.0)
        return run_client(profile, events=self.lab.events)


@pytest.fixture
def rpcauth_lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabHandle]:
    from .lab import Lab

    captures = request.config.getoption("--rpcauth-captures")
    lab = Lab(_config_for(request), captures=captures)
    with lab:
        yield LabHandle(lab)
