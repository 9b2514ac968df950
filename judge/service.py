"""Starting and stopping the judge on a running Ray cluster: `start_judge(cfg)` deploys the Serve
applications the config asks for and returns a `JudgeService`, the driver's `core.seams.Scorer`.

    judge.llm.type   Serve applications deployed                      judge endpoint the rewards call
    lexical          judge-llm (LexicalJudgeServer) + reward          http://<host>:<port>/judge-llm/v1
    vllm             judge-llm (VLLMJudgeServer, GPUs) + reward       http://<host>:<port>/judge-llm/v1
    external         reward                                           judge.llm.base_url (key from env)
"""

from __future__ import annotations

import logging
import threading
import time

from core.config import (
    ExternalJudgeConfig,
    JudgeConfig,
    LexicalJudgeConfig,
    VLLMJudgeConfig,
)
from core.records import JudgeStats, RolloutGroup, ScoredGroup
from judge.client import JudgeEndpoint
from judge.prompt_file import load_system_prompt

log = logging.getLogger(__name__)

REWARD_APP, JUDGE_LLM_APP = "reward", "judge-llm"
WAIT_POLL_S = 0.25
"""How often Serve's status is read while waiting for applications to come up or go."""
STOP_WAIT_S = 60.0
"""How long `JudgeService.stop` waits for its applications to be deleted."""


class JudgeService:
    """The deployed judge: `await score(group)`, `await stats()`, `url` (HTTP, msgpack), `stop()`."""

    def __init__(self, *, handle, board, url: str, apps: tuple[str, ...], started_serve: bool = False) -> None:
        self.handle, self.board, self.url, self.apps = handle, board, url, apps
        self.started_serve = started_serve
        """Serve was not running before `start_judge`: `stop()` shuts it down too (a job leaves nothing behind)."""

    async def score(self, group: RolloutGroup) -> ScoredGroup:
        return await self.handle.score.remote(group)

    async def stats(self) -> JudgeStats:
        """Counters summed over reward replicas; latency percentiles are the worst replica's."""
        return JudgeStats.merge(await self.board.all.remote())

    def stop(self) -> None:
        import ray
        from ray import serve

        for app in self.apps:  # all at once (one being deployed takes seconds to delete), waited for below
            serve.delete(app, _blocking=False)
        deadline = time.monotonic() + STOP_WAIT_S
        while (left := set(self.apps) & set(serve.status().applications)) and time.monotonic() < deadline:
            time.sleep(WAIT_POLL_S)
        if left:
            log.warning("the judge's Serve applications %s were not deleted within %gs", sorted(left), STOP_WAIT_S)
        ray.kill(self.board)
        if self.started_serve and not serve.status().applications:
            serve.shutdown()


SERVE_ENV = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30"}
"""Environment for the Serve controller a job starts (put in the job's runtime env, which the controller
inherits): Serve kills an HTTP proxy that does not answer within 5 s of starting, and on a busy 2-core
machine a proxy's process can take longer to import; `serve.start` then fails with the proxy's
ActorDiedError (seen in CI under `ray job submit`)."""


class JudgeStartCancelled(Exception):
    """A stop request came while the judge was starting; what had been deployed is deleted."""


class JudgeStartFailed(RuntimeError):
    """The judge's applications failed to deploy; the message names which and why."""


class JudgeStartTimedOut(JudgeStartFailed):
    """The judge did not come up within its deadline; the message names what was still waiting."""


QUIET = {"log_level": "WARNING", "enable_access_log": False}
"""Per-request access lines would flood the job log (thousands a step); they stay in Serve's log files
(serve.start's logging config covers only the proxy and controller, so each app gets it too)."""


def start_judge(cfg: JudgeConfig, *, cancel: threading.Event | None = None,
                deadline_s: float | None = None) -> JudgeService:
    """Deploy the judge's Serve applications (after `ray.init`), all at once, and wait until they answer.
    The wait ends early when `cancel` is set (`JudgeStartCancelled`), at `deadline_s` (`JudgeStartTimedOut`)
    or when a deployment fails (`JudgeStartFailed`); each way what was deployed is deleted."""
    import ray
    from ray import serve

    from judge.app import RewardServer, StatsBoard

    until = None if deadline_s is None else time.monotonic() + deadline_s
    _check_cancel(cancel)
    started_serve = not serve_running()
    if started_serve:
        serve.start(http_options={"host": cfg.http_host, "port": cfg.http_port}, logging_config=QUIET)
    base = _proxy_base(cfg)
    endpoint, targets = _judge_llm(cfg, base)
    board = StatsBoard.remote()
    reward = RewardServer.options(num_replicas=cfg.num_reward_replicas).bind(
        cfg, endpoint, board=board, num_verify_workers=cfg.num_verify_workers,
        verify_timeout_s=cfg.verify_timeout_s, system_prompt=load_system_prompt(cfg.prompt_file))
    targets.append(serve.RunTarget(reward, name=REWARD_APP, route_prefix=f"/{REWARD_APP}", logging_config=QUIET))
    service = JudgeService(handle=None, board=board, url=f"{base}/{REWARD_APP}/score",
                           apps=tuple(t.name for t in targets), started_serve=started_serve)
    try:
        service.handle = serve.run_many(targets, wait_for_applications_running=False)[-1]
        _wait_running(service.apps, cancel=cancel, until=until, deadline_s=deadline_s)
        try:
            ray.get(board.all.remote(), timeout=_left(until))  # the board is up before the first report
            service.handle.warm_up.remote().result(timeout_s=_left(until))
        except TimeoutError as e:  # ray's GetTimeoutError and Serve's both are
            raise JudgeStartTimedOut(f"the judge's reward replicas did not warm up within {deadline_s:g}s") from e
    except BaseException:
        service.stop()
        raise
    log.info("judge up: score at %s, judge LLM at %s (%s)", service.url, endpoint.base_url, endpoint.model)
    return service


def _judge_llm(cfg: JudgeConfig, base: str) -> tuple[JudgeEndpoint, list]:
    """The endpoint the rewards call, and the judge-llm application to deploy for it (none for an external one)."""
    from ray import serve

    from judge.app import LexicalJudgeServer, VLLMJudgeServer

    llm = cfg.llm
    if isinstance(llm, ExternalJudgeConfig):
        return JudgeEndpoint(llm.base_url, llm.model, api_key_env=llm.api_key_env), []
    if isinstance(llm, LexicalJudgeConfig):
        app, model = LexicalJudgeServer.bind(), "lexical-judge"
    else:
        assert isinstance(llm, VLLMJudgeConfig), type(llm)
        server = VLLMJudgeServer.options(num_replicas=llm.num_replicas,
                                         ray_actor_options={"num_cpus": 0, "num_gpus": llm.num_gpus_per_replica})
        app, model = server.bind(llm), llm.model_path
    target = serve.RunTarget(app, name=JUDGE_LLM_APP, route_prefix=f"/{JUDGE_LLM_APP}", logging_config=QUIET)
    return JudgeEndpoint(f"{base}/{JUDGE_LLM_APP}/v1", model), [target]


def _wait_running(apps: tuple[str, ...], *, cancel: threading.Event | None, until: float | None,
                  deadline_s: float | None) -> None:
    """Poll Serve until every app runs; a failed app, the deadline or `cancel` ends the wait."""
    from ray import serve

    while waiting := _not_running(apps, serve.status().applications):
        if until is not None and time.monotonic() > until:
            raise JudgeStartTimedOut(f"the judge did not come up within {deadline_s:g}s: {'; '.join(waiting)}")
        if cancel is None:
            time.sleep(WAIT_POLL_S)
        elif cancel.wait(WAIT_POLL_S):
            _check_cancel(cancel)


def _not_running(apps: tuple[str, ...], status: dict) -> list[str]:
    """'app STATUS: Serve's message' for each app not running yet; `JudgeStartFailed` for one that failed."""
    from ray.serve.schema import ApplicationStatus

    waiting = []
    for app in apps:
        app_status = status.get(app)
        state = app_status.status if app_status else ApplicationStatus.NOT_STARTED
        if state == ApplicationStatus.DEPLOY_FAILED:  # as serve.run's own wait
            raise JudgeStartFailed(f"the judge's Serve application {app!r} failed to deploy: {app_status.message}")
        if state != ApplicationStatus.RUNNING:
            message = app_status.message if app_status else ""
            waiting.append(f"{app} {state.value}" + (f": {message}" if message else ""))
    return waiting


def _check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise JudgeStartCancelled("a stop request came while the judge was starting")


def _left(until: float | None) -> float | None:
    return None if until is None else max(1.0, until - time.monotonic())


def serve_running() -> bool:
    """Whether Serve's controller runs on the connected cluster."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return True
    except ValueError:
        return False


def _proxy_base(cfg: JudgeConfig) -> str:
    """The HTTP proxy's address. Serve already running on the cluster keeps its own http options (serve.start
    does not change them): its proxy is where the apps are reached, whatever judge.http_host/http_port say."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    http = ray.get(controller.get_http_config.remote())
    if (http.host, http.port) != (cfg.http_host, cfg.http_port):
        log.warning("Serve was already running with its HTTP proxy on %s:%d; the judge is reached there, not at "
                    "judge.http_host:http_port=%s:%d", http.host, http.port, cfg.http_host, cfg.http_port)
    return f"http://{_client_host(http.host)}:{http.port}"


def _client_host(host: str) -> str:
    """Where a local client reaches a server bound to `host` (a wildcard bind is reached on loopback)."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
