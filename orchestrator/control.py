"""A running stage's control point: a named Ray actor that takes a graceful-stop request.

The driver creates ``RunControl`` under the name ``control-<run>`` in the ``r1lab``
namespace and polls it at every step boundary. ``r1lab stop`` reaches it by submitting a
tiny Ray job (``python -m orchestrator.control stop RUN``) to the same cluster, so it works
wherever the Ray Jobs API does — a laptop or a KubeRay head behind its dashboard port.
"""

from __future__ import annotations

import sys
import time

NAMESPACE = "r1lab"


class RunControl:
    def __init__(self) -> None:
        self.stop_requested = False
        self.state = "running"
        self.checkpoint: str | None = None

    def request_stop(self) -> bool:
        self.stop_requested = True
        return True

    def should_stop(self) -> bool:
        return self.stop_requested

    def mark(self, state: str, checkpoint: str | None = None) -> None:
        self.state = state
        if checkpoint is not None:
            self.checkpoint = checkpoint

    def status(self) -> dict:
        return {"state": self.state, "stop_requested": self.stop_requested, "checkpoint": self.checkpoint}


def actor_name(run: str) -> str:
    return f"control-{run}"


def start_control(run: str):
    import ray

    from orchestrator import placement

    return ray.remote(RunControl).options(
        name=actor_name(run), namespace=NAMESPACE, get_if_exists=True, **placement.control_options()
    ).remote()


def request_stop(run: str, *, wait_s: float = 600.0) -> dict:
    """Ask run ``run`` to stop at its next step boundary; wait until it has checkpointed."""
    import ray

    try:
        control = ray.get_actor(actor_name(run), namespace=NAMESPACE)
    except ValueError:
        raise SystemExit(f"no running stage named {run!r} on this cluster") from None
    ray.get(control.request_stop.remote())
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            status = ray.get(control.status.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - the driver exited: it has stopped
            return {"state": "exited"}
        if status["state"] in ("stopped", "finished", "failed"):
            return status
        time.sleep(1.0)
    raise SystemExit(f"run {run!r} did not reach a step boundary within {wait_s:.0f}s")


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "stop":
        sys.stderr.write("usage: python -m orchestrator.control stop RUN\n")
        return 2
    import ray

    ray.init(address="auto", namespace=NAMESPACE, log_to_driver=False)
    status = request_stop(argv[1])
    sys.stdout.write(f"[r1lab] stop {argv[1]}: {status}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
