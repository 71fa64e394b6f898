"""scripts/probe_keyserver.py against the session's key server (its real broker and PyKMIP
processes): every hostile case holds its connections while a host gets a nonce (the broker
fetching the key from KMIP) and the tenant gets the key from KMIP, within a bound; every refusal
says why; 100 honest hosts at once are all answered. The server's deadlines themselves: tests/tenant/test_broker_hostile.py and here for
an idle connection to each port."""

from __future__ import annotations

import concurrent.futures

from helpers import load_script, patience


def test_hostile_peers_against_the_running_key_server(mktme_keyserver, tmp_path):
    probe = load_script("probe_keyserver")
    report = probe.run(mktme_keyserver.tenant, mktme_keyserver.info, tmp_path, bound=patience(2), flood=100,
                       wait_close=False)
    assert [c for c in report["cases"] if c["problems"]] == []
    assert len(report["cases"]) == 19 and report["cases"][-1]["answered"] == 100


def test_an_idle_connection_to_each_port_is_dropped_at_the_handshake_deadline(mktme_keyserver):
    probe = load_script("probe_keyserver")
    info = mktme_keyserver.info
    ports = (info.broker_port, info.kmip_port)
    socks = [probe.idle_tcp(port)[0] for port in ports]
    try:                                          # both deadlines run at once: waited out together
        with concurrent.futures.ThreadPoolExecutor(len(socks)) as pool:
            closed = list(pool.map(lambda s: probe.closed_within(s, 5.0 + patience(3))[0], socks))
    finally:
        for sock in socks:
            sock.close()
    for port, after in zip(ports, closed):
        assert after is not None and after >= 4.0, (port, after)
