"""Replicated serving: several `atelier serve` processes over one index folder, one client across them.

The client's target forms and channel options are checked without a server. Two real replicas
(separate processes, real sockets) take load through one balanced client while one of them is
SIGKILLed, and the survivor picks up a newly published index by itself (--watch-index); a replica
still loading (every call UNAVAILABLE) beside a loaded one costs the caller nothing either.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from atelier import artifacts
from atelier.cli import main
from atelier.retrieval.service import Limits
from atelier.server.app import SERVICE_NAME, start_server
from atelier.server.client import AtelierClient
from atelier.server.security import SecurityConfigError, channel_options, channel_target
from tests.test_app import WAIT, Load, publish_copy, wait_until

REPO = Path(__file__).resolve().parents[1]
COMMITTED_CGAN = REPO / "checkpoints" / "cgan-fashion-mnist"


# --- targets and channel options -----------------------------------------------------------------


@pytest.mark.parametrize("given, expected", [
    ("127.0.0.1:50051", "127.0.0.1:50051"),  # one server: as today
    ("localhost:50051", "localhost:50051"),
    (" 10.0.0.5:50051, 10.0.0.6:50051 ", "ipv4:10.0.0.5:50051,10.0.0.6:50051"),
    ("[::1]:50051,[fd00::6]:50051", "ipv6:[::1]:50051,[fd00::6]:50051"),
    ("dns:///atelier.shop.svc.cluster.local:50051", "dns:///atelier.shop.svc.cluster.local:50051"),
    ("ipv4:10.0.0.5:1,10.0.0.6:1", "ipv4:10.0.0.5:1,10.0.0.6:1"),
    ("unix:/run/atelier.sock", "unix:/run/atelier.sock"),
])
def test_server_targets_become_grpc_targets(given, expected):
    assert channel_target(given) == expected


@pytest.mark.parametrize("given, fragment", [
    ("a.example:1,b.example:2", "'a.example:1' in server target 'a.example:1,b.example:2' is not IP:PORT; "
                                "for a host name give dns:///a.example:1"),
    ("10.0.0.5:50051,", "has an empty entry"),
    ("", "has an empty entry"),
    ("10.0.0.5:50051,[::1]:50051", "mixes IPv4 and IPv6 addresses"),
    ("10.0.0.5,10.0.0.6:50051", "'10.0.0.5' in server target"),
    ("10.0.0.5:0,10.0.0.6:50051", "a port 1-65535"),
    ("::1:50051,::1:50052", "an IPv6 address in brackets"),
])
def test_a_malformed_target_list_is_refused_naming_the_forms_allowed(given, fragment):
    with pytest.raises(ValueError) as error:
        channel_target(given)
    assert fragment in str(error.value)
    assert "or dns:///NAME:PORT" in str(error.value)  # and what is allowed


def test_every_channel_balances_round_robin_and_retries_unavailable():
    options = dict(channel_options())
    config = json.loads(options["grpc.service_config"])
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    (method,) = config["methodConfig"]
    assert method["name"] == [{"service": SERVICE_NAME}]  # every method of the service the server runs
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert method["retryPolicy"]["maxAttempts"] > 1
    assert options["grpc.enable_retries"] == 1
    assert dict(channel_options("shop.example"))["grpc.ssl_target_name_override"] == "shop.example"


def test_tls_to_a_list_needs_the_certificates_name():
    with pytest.raises(SecurityConfigError, match="give --server-name NAME"):
        AtelierClient("10.0.0.5:50051,10.0.0.6:50051", tls=True)


def test_atelier_query_names_the_target_forms_it_takes(capsys):
    assert main(["query", "--target", "shop-a:50051,shop-b:50051", "--schema"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("atelier query: error: 'shop-a:50051' in server target")
    assert "for a host name give dns:///shop-a:50051" in err


# --- two replicas, one killed --------------------------------------------------------------------


class Replica:
    """One `atelier serve` process on a port of its own (port 0: the server picks a free one and
    prints it), watching `index`. Its log goes to a file: a pipe nobody reads could fill and stall it."""

    def __init__(self, index: Path, log: Path):
        self.log = log
        # Two servers share this machine's cores: one torch thread each.
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with log.open("w") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "atelier.cli", "serve", "--index", str(index), "--model", f"cgan={COMMITTED_CGAN}",
                 "--address", "127.0.0.1:0", "--watch-index", "0.2", "--log-format", "json"],
                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
        self.port: int | None = None

    def wait_listening(self) -> str:
        line = self.process.stdout.readline()  # printed once the models and index are loaded
        found = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        assert found, f"replica did not start: {line!r}\n{self.log.read_text()[-3000:]}"
        self.port = int(found.group(1))
        return self.address

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def answered(self) -> int:
        """GenerateAndRetrieve calls this replica answered OK, from its JSON request log."""
        lines = self.log.read_text().split("\n")[:-1]  # the last may be half written
        calls = [json.loads(line) for line in lines if line.startswith("{")]
        return sum(1 for c in calls if c.get("logger") == "atelier.requests"
                   and c.get("method") == "GenerateAndRetrieve" and c.get("code") == "OK")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(WAIT)


def results_so_far(load: Load) -> int:
    with load.lock:
        return len(load.results)


def test_two_replicas_lose_one_under_load_without_a_failed_call_and_the_survivor_serves_a_new_index(
        small_index, tmp_path, capsys):
    index = tmp_path / "index"  # the one folder both replicas serve and watch
    old = publish_copy(small_index, index)
    replicas = [Replica(index, tmp_path / f"replica-{i}.log") for i in range(2)]
    try:
        target = ",".join(replica.wait_listening() for replica in replicas)
        doomed, survivor = replicas
        with AtelierClient(target, timeout=WAIT) as client, Load(target, threads=3) as load:
            # round robin: both replicas answer the one client's calls
            wait_until(lambda: doomed.answered() >= 3 and survivor.answered() >= 3, "calls answered by both replicas")
            doomed.process.send_signal(signal.SIGKILL)  # mid-load: calls are in flight on it
            assert doomed.process.wait(WAIT) == -signal.SIGKILL
            at_kill, survivor_at_kill = results_so_far(load), survivor.answered()
            wait_until(lambda: results_so_far(load) >= at_kill + 10, "calls after the kill")
            assert survivor.answered() > survivor_at_kill

            new = publish_copy(small_index, index)  # as a reindex job publishes: a new version, one rename
            assert new != old and artifacts.resolve(index).name == new
            wait_until(lambda: client.get_schema().index.version == new, "the survivor to serve the new index")
            load.swapped()  # calls started from here on must get the new version
        errors = [error for _, _, error in load.results if error]
        assert not errors, errors[:3]  # not one failed call at the client, across the kill
        assert {version for after, version, _ in load.results if after} == {new}

        # `atelier query` takes the same list (one address dead) and a DNS name
        assert main(["query", "--target", target, "--schema"]) == 0
        assert json.loads(capsys.readouterr().out)["index"]["version"] == new
        with AtelierClient(f"dns:///localhost:{survivor.port}", timeout=WAIT) as by_name:
            assert by_name.get_schema().index.version == new
        assert survivor.stop() == 0
    finally:
        for replica in replicas:
            replica.stop()


def test_a_replica_still_loading_costs_the_caller_nothing_when_another_is_up(server):
    """A replica that has bound its port but not loaded answers UNAVAILABLE; the client retries on the other."""
    loading = start_server(None, limits=Limits())  # listening, nothing loaded: every call UNAVAILABLE

    def refused() -> float:
        labels = {"face": "grpc", "method": "GenerateAndRetrieve", "code": "UNAVAILABLE"}
        return loading.telemetry.registry.get_sample_value("atelier_requests_total", labels) or 0

    try:
        with AtelierClient(f"{loading.target},{server.target}", timeout=WAIT) as client:
            answers = []
            while refused() < 2 and len(answers) < 100:  # until round robin has sent the loading one some
                answers.append(client.generate_and_retrieve({"category": "Bag"}, num_samples=1, top_k=2,
                                                            seed=len(answers)))
        assert refused() >= 2
        assert all(len(answer.products) == 2 for answer in answers)  # each of those retried, and answered
    finally:
        loading.stop(grace=0)


def test_a_server_with_a_maximum_connection_age_closes_connections_and_clients_reconnect(service):
    """--max-connection-age: the server sends GOAWAY after the age, the client's channel leaves
    READY (where a client balancing over a DNS name resolves it again), and its next call is answered."""
    import threading

    import grpc

    with pytest.raises(ValueError, match="positive"):
        start_server(service, max_connection_age=0)
    aged = start_server(service, max_connection_age=0.5)
    try:
        with AtelierClient(aged.target, timeout=WAIT) as client:
            states, left_ready = [], threading.Event()

            def seen(state: grpc.ChannelConnectivity) -> None:
                if states and states[-1] == grpc.ChannelConnectivity.READY and state != state.READY:
                    left_ready.set()
                states.append(state)

            client.channel.subscribe(seen, try_to_connect=False)
            assert client.get_schema().index.count > 0
            assert left_ready.wait(WAIT), f"the connection was never closed: states {states}"
            assert client.get_schema().index.count > 0  # a new connection
            client.channel.unsubscribe(seen)
    finally:
        aged.stop(grace=0)
