"""Waiting on a shared.keys.HandshakeMonitor in tests (real CURVE handshakes take a moment)."""


def wait_for_handshake(mon, want: str, tries: int = 50, step_ms: int = 100) -> str:
    """Poll until the monitor reports ``want`` (or give up); returns the last state seen."""
    state = "connecting"
    for _ in range(tries):
        state = mon.poll(step_ms)
        if state == want:
            break
    return state
