"""Starting and stopping the judge on a running Ray cluster: `start_judge(cfg)` deploys the Serve
applications the config asks for and returns a `JudgeService`, the driver's `core.seams.Scorer`.

    judge.llm.type   Serve applications deployed                      judge endpoint the rewards call
    lexical          judge-llm (LexicalJudgeServer) + reward          http://<host>:<port>/judge-llm/v1
    vllm             judge-llm (VLLMJudgeServer, GPUs) + reward       http://<host>:<port>/judge-llm/v1
    external         reward                                           judge.llm.base_url (key from env)
"""

from __future__ import annotations

import logging

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

        for app in self.apps:
            serve.delete(app)
        ray.kill(self.board)
        if self.started_serve and not serve.status().applications:
            serve.shutdown()


SERVE_ENV = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30"}
"""Environment for the Serve controller a job starts (put in the job's runtime env, which the controller
inherits): Serve kills an HTTP proxy that does not answer within 5 s of starting, and on a busy 2-core
machine a proxy's process can take longer to import; `serve.start` then fails with the proxy's
ActorDiedError (seen in CI under `ray job submit`)."""


def start_judge(cfg: JudgeConfig) -> JudgeService:
    """Deploy the judge's Serve applications (after `ray.init`) and wait until they answer."""
    import ray
    from ray import serve

    from judge.app import LexicalJudgeServer, RewardServer, StatsBoard, VLLMJudgeServer

    # per-request access lines would flood the job log (thousands a step); they stay in Serve's log files
    quiet = {"log_level": "WARNING", "enable_access_log": False}  # serve.start's covers only the proxy and controller
    started_serve = not serve_running()
    if started_serve:
        serve.start(http_options={"host": cfg.http_host, "port": cfg.http_port}, logging_config=quiet)
    base = _proxy_base(cfg)
    llm, apps = cfg.llm, [REWARD_APP]
    if isinstance(llm, LexicalJudgeConfig):
        serve.run(LexicalJudgeServer.bind(), name=JUDGE_LLM_APP, route_prefix=f"/{JUDGE_LLM_APP}",
                  logging_config=quiet)
        endpoint, apps = JudgeEndpoint(f"{base}/{JUDGE_LLM_APP}/v1", "lexical-judge"), [JUDGE_LLM_APP, REWARD_APP]
    elif isinstance(llm, VLLMJudgeConfig):
        server = VLLMJudgeServer.options(num_replicas=llm.num_replicas,
                                         ray_actor_options={"num_cpus": 0, "num_gpus": llm.num_gpus_per_replica})
        serve.run(server.bind(llm), name=JUDGE_LLM_APP, route_prefix=f"/{JUDGE_LLM_APP}",
                  logging_config=quiet)
        endpoint, apps = JudgeEndpoint(f"{base}/{JUDGE_LLM_APP}/v1", llm.model_path), [JUDGE_LLM_APP, REWARD_APP]
    else:
        assert isinstance(llm, ExternalJudgeConfig), type(llm)
        endpoint = JudgeEndpoint(llm.base_url, llm.model, api_key_env=llm.api_key_env)
    board = StatsBoard.remote()
    reward = RewardServer.options(num_replicas=cfg.num_reward_replicas).bind(
        cfg, endpoint, board=board, num_verify_workers=cfg.num_verify_workers,
        verify_timeout_s=cfg.verify_timeout_s, system_prompt=load_system_prompt(cfg.prompt_file))
    handle = serve.run(reward, name=REWARD_APP, route_prefix=f"/{REWARD_APP}", logging_config=quiet)
    ray.get(board.all.remote())  # the board is up before the first report
    handle.warm_up.remote().result()
    log.info("judge up: score at %s/%s/score, judge LLM at %s (%s)", base, REWARD_APP, endpoint.base_url, endpoint.model)
    return JudgeService(handle=handle, board=board, url=f"{base}/{REWARD_APP}/score", apps=tuple(apps),
                        started_serve=started_serve)


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
