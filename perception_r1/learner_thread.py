"""Ray Train's blocking `fit()` in a thread of the driver, and the way to end it before Ray shuts down.

`ray.shutdown()` while another thread waits inside `fit()` ends the driver process (measured with Ray 2.60
on this machine: "The core worker has already been shutdown ... The process will exit", exit 1; once in CI,
SIGSEGV). So a run that stops before its learner has finished (a Ctrl-C during start-up, a fatal error)
aborts Ray Train's controller, as Ray's own Ctrl-C handler does when `fit()` runs on the main thread (or,
while the learner is still starting and has nothing to save, kills it), and waits for the thread before
shutting Ray down.
"""

from __future__ import annotations

import logging
import threading

import ray
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy

log = logging.getLogger("perception_r1")
KILL_WAIT_S = 15.0
"""How long `LearnerThread.end` waits after killing a controller that ignored its abort."""


class AbortableTrainer(TorchTrainer):
    """A `TorchTrainer` that keeps its controller's handle so that another thread can abort the run.

    Ray 2.60 (pinned in pyproject.toml) creates the controller in the private `_initialize_and_run_controller`
    and keeps no handle; this override is that method's body with the handle kept. Written here, not with a
    public API, because Ray Train v2 offers no way to abort a `fit()` running off the main thread. Two more
    overrides leave out Ray Train's helpers that a run does not need (`_create_default_callbacks`, and
    `OwnClusterPolicy` on a cluster the run started): each is a process started at every learner start."""

    def __init__(self, *args, own_cluster: bool = False, **kwargs) -> None:
        """`own_cluster`: the cluster is one this run started (`ray.init()` of a local one), so it has no autoscaler
        and ends with the run; Ray Train's helpers for autoscaled, shared clusters are left out (see
        `OwnClusterPolicy` and `_create_default_callbacks`)."""
        super().__init__(*args, **kwargs)
        self._own_cluster = own_cluster
        self._lock = threading.Lock()
        self._controller = None
        self._aborted = False

    def _create_default_callbacks(self) -> list:
        """Ray Train's own callbacks, less the datasets one when the trainer has no Ray Datasets (the learner reads
        the replay buffer): that callback starts a DatasetManager actor at every learner start all the same (~3 s
        of CPU on 2 cores, measured; a worker without it gets no dataset shard provider, which it never asks for);
        and on an own cluster, less the placement-group cleaner."""
        from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

        left_out = (() if self.datasets else (DatasetsCallback,)) + (
            # a detached actor that polls the state API every second to remove the worker group's placement group
            # should the controller die; an own cluster ends with the run, placement groups and all (~4 s of CPU)
            (PlacementGroupCleanerCallback,) if self._own_cluster else ())
        return [cb for cb in super()._create_default_callbacks() if not isinstance(cb, left_out)]

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        from ray._common.constants import RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR
        from ray.train.v2._internal.constants import (DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE,
                                                      ENABLE_PREEMPTION_WATCHER_ENV_VAR, get_env_vars_to_propagate)
        from ray.train.v2._internal.execution.controller import TrainController

        if self._own_cluster:
            controller_init_kwargs["scaling_policy"] = OwnClusterPolicy(self.scaling_config)
        env_vars = get_env_vars_to_propagate()
        env_vars.setdefault(RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR, DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE)
        if single_node():  # a preempted only node takes the controller with it: the watcher has nothing to do
            env_vars.setdefault(ENABLE_PREEMPTION_WATCHER_ENV_VAR, "0")  # (one process, ~2-3 s of CPU, per run)
        controller_cls = ray.remote(num_cpus=0, runtime_env={"env_vars": env_vars}, label_selector={
            ray._raylet.RAY_NODE_ID_KEY: ray.get_runtime_context().get_node_id()})(TrainController)
        with self._lock:
            if self._aborted:
                raise LearnerAborted("the learner was aborted before it started")
            self._controller = controller_cls.remote(**controller_init_kwargs)
        # The handle keeps the controller alive (upstream holds it in a local variable). Dropped when fit() returns,
        # Ray ends the controller and the actors it owns; kept, they would live as long as this trainer,
        # e.g. in a failed run's traceback.
        try:
            ray.get(self._controller.run.remote())
            return ray.get(self._controller.get_result.remote())
        finally:
            with self._lock:
                self._controller = None

    def abort(self) -> None:
        """Ask the controller to abort the run (its workers end with it), without waiting; a `fit()` not yet
        at its controller never starts one."""
        with self._lock:
            self._aborted = True
            controller = self._controller
        if controller is not None:
            controller.abort.remote()  # abort() ends the controller's process: fit() then raises

    def kill(self) -> None:
        """End the controller's process at once (one that did not honour `abort`, or one with nothing to save:
        its workers end with it, as actors do with their owner); a `fit()` not yet at its controller never
        starts one."""
        with self._lock:
            self._aborted = True
            controller = self._controller
        if controller is not None:
            ray.kill(controller, no_restart=True)


class OwnClusterPolicy(FixedScalingPolicy):
    """Ray Train's fixed-size policy without its requests to the autoscaler, for a cluster with none (one this run
    started). Upstream registers the learner's resources with a detached `_AutoscalingCoordinatorActor` (a new
    process that imports Ray Data) and waits up to 5 s for the answer: on a fresh local cluster on 2 cores the
    actor is not up in time, and the learner's start-up waited those 5 s ("Failed to send resource request", measured)."""

    def after_controller_start(self, train_run_context) -> None:
        """Upstream's, less creating the coordinator client and sending it the learner's resources."""
        self._requester_id = f"train-{train_run_context.run_id}"

    def _maybe_send_resource_request(self) -> None:
        """No coordinator to ask (upstream's `_cancel_resource_request` already skips a client never created)."""


def single_node() -> bool:
    """Whether the cluster has one live node (a local cluster, a one-machine head)."""
    return sum(1 for node in ray.nodes() if node.get("Alive")) == 1


class LearnerAborted(RuntimeError):
    """The driver aborted the learner before its controller started."""


class LearnerThread:
    """`fit()` in a daemon thread, started at once; `error()` is what it raised."""

    def __init__(self, trainer: AbortableTrainer) -> None:
        self.trainer = trainer
        self.result: dict = {}
        self.thread = threading.Thread(target=lambda: self.result.update(out=_fit(trainer)), name="learner-fit",
                                       daemon=True)
        self.thread.start()

    def alive(self) -> bool:
        return self.thread.is_alive()

    def error(self) -> BaseException | None:
        out = self.result.get("out")
        return out if isinstance(out, BaseException) else None

    def cancel(self) -> None:
        """End a learner with nothing to save yet (still starting) now: its controller is killed, not asked to
        abort, which it would honour only once its own start-up is done (~10 s measured on 2 busy cores).
        Returns at once; `end` waits for the thread."""
        if self.alive():
            self.trainer.kill()

    def end(self, timeout_s: float) -> bool:
        """Abort a learner still running and wait for its thread (at most `timeout_s`, then its controller is
        killed and waited for a little more): True once it ended."""
        if not self.alive():
            return True
        self.trainer.abort()
        self.thread.join(timeout=timeout_s)
        if self.alive():
            log.warning("the learner did not end within %.0fs of its abort; killing its controller", timeout_s)
            self.trainer.kill()
            self.thread.join(timeout=KILL_WAIT_S)
        return not self.alive()


def _fit(trainer: TorchTrainer) -> BaseException | None:
    try:
        trainer.fit()
        return None
    except BaseException as e:  # noqa: BLE001 -- handed to the main thread, which re-raises it
        return e
