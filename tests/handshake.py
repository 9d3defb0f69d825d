"""CURVE socket pairs and HandshakeMonitor waits for tests (real handshakes take a moment)."""

import zmq


def wait_for_handshake(mon, want: str, tries: int = 50, step_ms: int = 100) -> str:
    """Poll until the monitor reports ``want`` (or give up); returns the last state seen."""
    state = "connecting"
    for _ in range(tries):
        state = mon.poll(step_ms)
        if state == want:
            break
    return state


def curve_pair(ctx, server_kp, client_kp, pin):
    """A CURVE ROUTER on a random loopback port and a DEALER pinned to ``pin``, watched by a
    HandshakeMonitor: (server socket, client socket, monitor). The caller closes all three."""
    from shared import keys

    srv = ctx.socket(zmq.ROUTER)
    srv.linger = 0
    keys.configure_server(srv, server_kp)
    port = srv.bind_to_random_port("tcp://127.0.0.1")
    cli = ctx.socket(zmq.DEALER)
    cli.linger = 0
    keys.configure_client(cli, client_kp, pin)
    mon = keys.HandshakeMonitor(cli)
    cli.connect(f"tcp://127.0.0.1:{port}")
    return srv, cli, mon
