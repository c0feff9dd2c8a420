"""``ModelWatcher``: one thread per worker that keeps its models and traffic rules in line with the
repository and the workers' shared state, and rolls back failing candidates.

# design: four times a second the watcher rolls back what this worker's windows condemn
# (``TrafficControl.roll_back``), reads the shared state (``serving.runtime.control_files``) and,
# on a new generation, puts its traffic rules in force and (explicit mode) loads and unloads the
# models it wants; then it acknowledges the generation in its own file. In poll mode it also
# reconciles with the repository every ``SERVING_POLL_SECONDS``. Every mode runs it, so traffic
# rules change at run time whatever the model control; a worker that starts (or restarts) puts the
# shared rules in force before it serves its first request (``prime``).
"""

from __future__ import annotations

import logging
import os
import threading
import time

from serving.runtime.model_control import ModelControl
from serving.runtime.service import InferenceService
from serving.runtime.traffic_control import TrafficControl

log = logging.getLogger("serving")
TICK_S = 0.25


class ModelWatcher(threading.Thread):
    """Keeps one worker's models and traffic rules in line with the repository and the shared
    state."""

    def __init__(self, service: InferenceService, workers: int) -> None:
        super().__init__(name="model-watcher", daemon=True)
        self.service, self.workers = service, workers
        self.control = ModelControl.of(service)
        self.control.worker_count = workers  # how many acknowledgements a change waits for
        self.traffic = TrafficControl.of(service)
        self.stopping = threading.Event()
        self.generation = -1
        self._next_poll = time.monotonic() + service.settings.poll_seconds

    def prime(self) -> None:
        """Put the shared traffic rules in force now (a worker started after a change or a
        rollback must not route by the settings' rules until its first tick)."""
        self.traffic.sync(self.control.files.read())

    def run(self) -> None:
        while not self.stopping.wait(TICK_S):
            try:
                self.tick()
            except Exception:  # never let the thread die: the next tick retries
                log.exception("model control failed; the models served are unchanged")

    def tick(self) -> None:
        service, control = self.service, self.control
        settings = service.settings
        for name, version, kind, reason in service.traffic.verdicts():
            self.traffic.roll_back(name, version, kind, reason)
        if settings.model_control == "poll" and time.monotonic() >= self._next_poll:
            control.reconcile(self.workers)
            self._next_poll = time.monotonic() + settings.poll_seconds
        files = control.files
        state = files.read()
        generation = state["generation"] if state else 0
        changed = generation != self.generation
        if changed:
            self.traffic.sync(state)  # first: the planner keeps the versions a rule names
            if state is not None and settings.model_control == "explicit":
                control.reconcile(self.workers, names=list(state["models"]))
            elif state is not None and settings.model_control == "poll":
                control.reconcile(self.workers)
            self.generation = generation
        if changed or settings.model_control == "explicit" or service.traffic.releases:
            files.ack(
                str(os.getpid()),
                generation,
                service.index(unserved=True),
                service.traffic.snapshot(),
            )
