"""Serves a base checkpoint and every LoRA adapter in a directory over the OpenAI HTTP API, all from one copy of the
base weights, in one batch.

    python serve.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct --adapters_dir out/adapters

`GET /v1/models` lists the base (named after its directory) and each adapter (`*.safetensors` in --adapters_dir, named
by its file name without the extension); `POST /v1/completions` and `POST /v1/chat/completions` generate with the one
the request's `model` names, streamed as server-sent events with `stream: true`. An adapter copied into the directory
is picked up at the next request that names it (or the next `GET /v1/models`), without a restart.

One generation loop (batched.BatchGenerator, in a thread of its own) decodes every request in flight together, each
with its own adapter (multilora.py) and sampling settings; a finished request's slot goes to the next waiting one.
Built on FastAPI and uvicorn (howto/serve.md says why); see howto/serve.md for the limits and errors.
"""

import asyncio
import json
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, AsyncIterator, Literal, Optional, Union

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from batched import BatchGenerator, Job, QueueFull
from decode import Completion, load_inference_model
from lora import read_lora_chat_template
from multilora import AdapterStack, adapter_updates
from tokenizer import Tokenizer
from utils import cli, load_config, one_line


def main(
    checkpoint_dir: Path = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"),
    adapters_dir: Optional[Path] = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: Optional[str] = None,
    max_batch_size: int = 8,
    max_seq_length: int = 2048,
    max_tokens: int = 1024,
    max_prompt_tokens: int = 1024,
    max_waiting: int = 64,
    template: Optional[str] = None,
    precision: Optional[str] = None,
    shutdown_timeout: float = 10.0,
) -> None:
    """Serves the OpenAI API for the base checkpoint and the adapters in --adapters_dir until SIGTERM or Ctrl-C.

    Args:
        checkpoint_dir: the base checkpoint (lit_model.safetensors, model_config.json, the tokenizer); its directory
            name is the base's model name in the API.
        adapters_dir: a directory of adapters written by finetune_lora.py (`*.safetensors`), each served under its
            file name without the extension; new files are picked up while running. None serves the base alone.
        host: the address to listen on; 127.0.0.1 (the default) takes connections from this machine only, 0.0.0.0
            from anywhere (then set --api_key).
        port: the TCP port.
        api_key: require `Authorization: Bearer <api_key>` on every request (401 otherwise).
        max_batch_size: requests decoded together; more wait in the queue for a free slot. Each holds a KV cache row
            of max_seq_length tokens.
        max_seq_length: the longest prompt plus answer of one request, in tokens (at most the model's block_size).
        max_tokens: the largest `max_tokens` a request may ask for (400 above it).
        max_prompt_tokens: the longest prompt, in tokens, after the chat template (400 above it).
        max_waiting: requests that may wait for a slot; one more is refused with 429.
        template: a chat template built into tokenizer.py (llama-3, llama-2, chatml, alpaca) for the base and for
            adapters that recorded none, instead of the checkpoint's own.
        precision: "bf16-true", "16-true" or "32-true"; by default bf16-true on GPUs that support it, else 32-true.
        shutdown_timeout: seconds that SIGTERM gives requests in flight to finish; those still running after it
            are cancelled.
    """
    import uvicorn

    config = load_config(checkpoint_dir)
    max_seq_length = min(max_seq_length, config.block_size)
    if max_tokens < 1 or max_prompt_tokens < 1 or max_batch_size < 1 or max_waiting < 0:
        raise ValueError("--max_tokens, --max_prompt_tokens and --max_batch_size must be >= 1, --max_waiting >= 0")
    if adapters_dir is not None and not Path(adapters_dir).is_dir():
        raise ValueError(f"--adapters_dir {adapters_dir} is not a directory")
    model, loaded = load_inference_model(checkpoint_dir, precision=precision, many_rows=True)
    server = Server(
        base_name=Path(checkpoint_dir).resolve().name,
        tokenizer=Tokenizer(checkpoint_dir),
        generator=BatchGenerator(model, AdapterStack(model), max_batch_size, max_seq_length, max_waiting),
        adapters_dir=None if adapters_dir is None else Path(adapters_dir),
        template=template,
        api_key=api_key,
        max_tokens=max_tokens,
        max_prompt_tokens=max_prompt_tokens,
    )
    server.scan_adapters()
    print(
        f"{loaded}; {len(server.adapters)} adapters; serving {', '.join(server.model_names())} on "
        f"http://{host}:{port}/v1",
        file=sys.stderr,
    )
    # The generation loop runs in this thread, which loaded the model: PyTorch's OpenMP threads belong to the thread
    # that first runs a parallel operation, and a second thread decoding starts a second team of them, oversubscribing
    # the cores (on 2 cores every small operation then took 4x as long; a 16-row step 84 ms instead of 50). uvicorn
    # serves HTTP from its own thread; SIGTERM or Ctrl-C lets it shut down gracefully (requests in flight finish
    # within --shutdown_timeout, decoded meanwhile), then the loop stops and the process exits with status 0.
    web = uvicorn.Server(
        uvicorn.Config(
            build_app(server), host=host, port=port, timeout_graceful_shutdown=shutdown_timeout, log_level="warning"
        )
    )
    stop = threading.Event()

    def serve_http() -> None:
        try:
            web.run()
        finally:
            stop.set()

    def shut_down(*_) -> None:
        web.force_exit = web.should_exit  # a second signal: no more waiting
        web.should_exit = True

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, shut_down)
    http = threading.Thread(target=serve_http, name="http", daemon=True)
    http.start()
    try:
        server.generator.loop(stop)
    finally:
        server.generator.cancel_all()
    http.join()
    if not web.started:  # uvicorn said why on stderr (the port taken, say)
        raise OSError(f"could not serve on http://{host}:{port}")


@dataclass
class Server:
    """What the endpoints share: the model's generation loop, the tokenizer, the adapters by name and the limits."""

    base_name: str
    tokenizer: Tokenizer
    generator: BatchGenerator
    adapters_dir: Optional[Path]
    template: Optional[str]
    api_key: Optional[str]
    max_tokens: int
    max_prompt_tokens: int
    adapters: dict[str, Path] = field(default_factory=dict)  # loaded, by model name
    templates: dict[str, Optional[str]] = field(default_factory=dict)  # each adapter's recorded chat template
    broken: dict[Path, float] = field(default_factory=dict)  # files that failed to load, by their mtime then
    created: int = field(default_factory=lambda: int(time.time()))

    def model_names(self) -> list[str]:
        return [self.base_name, *self.adapters]

    def scan_adapters(self) -> None:
        """Loads every adapter file in adapters_dir not loaded yet (one that fails is said on stderr, and tried again
        only once the file changes). On the generation loop's thread, between two steps (main() before the loop,
        the endpoints through BatchGenerator.between_steps): scans never overlap, nor a scan and a step."""
        if self.adapters_dir is None:
            return
        for path in sorted(self.adapters_dir.glob("*.safetensors")):
            self.load_adapter(path)

    def load_adapter(self, path: Path) -> None:
        name = path.stem
        if name in self.adapters or name == self.base_name or self.broken.get(path) == path.stat().st_mtime:
            return
        try:
            updates = adapter_updates(path, self.generator.model)
            template = read_lora_chat_template(path)
        except (ValueError, OSError) as e:
            self.broken[path] = path.stat().st_mtime
            print(f"skipped adapter {path}: {one_line(e)}", file=sys.stderr)
            return
        self.generator.stack.add(name, updates)
        self.adapters[name], self.templates[name] = path, template


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: Optional[str] = None,
        code: Optional[str] = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


# The request bodies: FastAPI checks each against its pydantic model (422 naming the field otherwise)


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(None, ge=1)  # not OpenAI's, as vLLM and others accept it
    stop: Optional[Union[str, list[str]]] = Field(None, max_length=4)
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[dict[str, Any]] = None
    n: int = Field(1, ge=1, le=1)


class CompletionBody(SamplingFields):
    prompt: Union[str, list[str], list[int]]


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatBody(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)


def build_app(server: Server) -> FastAPI:
    """The FastAPI application: its endpoints and error handlers (main() runs the generation loop beside it)."""
    app = FastAPI(title="lora-llama")
    app.state.server = server
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, invalid_body)
    app.add_exception_handler(HTTPException, http_error)
    authorized = [Depends(check_api_key)]
    app.add_api_route("/v1/models", models, methods=["GET"], dependencies=authorized)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/v1/completions", completions, methods=["POST"], dependencies=authorized)
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"], dependencies=authorized)
    return app


def server_of(request: Request) -> Server:
    return request.app.state.server


ServerDep = Annotated[Server, Depends(server_of)]  # an endpoint's argument `server: ServerDep` is the app's Server


# The endpoints: each checks the request, submits a job to the generation loop, and shapes the answer


async def models(server: ServerDep) -> dict:
    """GET /v1/models: the base and every adapter, looking into adapters_dir for new ones first."""
    await asyncio.wrap_future(server.generator.between_steps(server.scan_adapters))  # on the loop's thread (main)
    cards = [
        {"id": name, "object": "model", "created": server.created, "owned_by": "lora-llama"}
        for name in server.model_names()
    ]
    return {"object": "list", "data": cards}


async def health(server: ServerDep) -> dict:
    """GET /health, for load balancers and tests: jobs decoding now, waiting for a slot, and ended so far by reason."""
    generator = server.generator
    running = sum(job is not None for job in generator.jobs)
    return {"status": "ok", "running": running, "waiting": len(generator.waiting), "ended": dict(generator.ended)}


async def completions(body: CompletionBody, request: Request, server: ServerDep):
    """POST /v1/completions: continues `prompt`, a text (encoded with BOS), a list of one text, or token ids."""
    adapter = await adapter_of(server, body.model)
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):  # a list of prompts: one is served
        if len(prompt) != 1:
            raise APIError(400, f"one prompt per request, not {len(prompt)}", param="prompt")
        prompt = prompt[0]
    ids = prompt if isinstance(prompt, list) else server.tokenizer.encode(prompt).tolist()
    answer = submit(server, body, adapter, ids, body.max_tokens)
    return await respond(request, body, answer, Reply(f"cmpl-{uuid.uuid4().hex}", body.model, chat=False))


async def chat_completions(body: ChatBody, request: Request, server: ServerDep):
    """POST /v1/chat/completions: answers `messages` rendered in the adapter's chat template, else --template, else
    the checkpoint's."""
    adapter = await adapter_of(server, body.model)
    template = server.templates.get(adapter) or server.template
    messages = [message.model_dump() for message in body.messages]
    try:
        text = server.tokenizer.apply_chat_template(messages, add_generation_prompt=True, template=template)
    except ValueError as e:
        raise APIError(400, one_line(e), param="messages") from None
    ids = server.tokenizer.encode(text, bos=False).tolist()
    answer = submit(server, body, adapter, ids, body.max_completion_tokens or body.max_tokens)
    return await respond(request, body, answer, Reply(f"chatcmpl-{uuid.uuid4().hex}", body.model, chat=True))


# Checking and submitting a request


async def check_api_key(request: Request, server: ServerDep) -> None:
    if server.api_key is not None and request.headers.get("authorization") != f"Bearer {server.api_key}":
        raise APIError(
            401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'", code="invalid_api_key"
        )


async def adapter_of(server: Server, model: str) -> str:
    """The adapter the request's `model` names ("" for the base), looking into adapters_dir for a new one."""
    if model == server.base_name:
        return ""
    if model not in server.adapters:
        await asyncio.wrap_future(server.generator.between_steps(server.scan_adapters))  # on the loop's thread (main)
    if model not in server.adapters:
        raise APIError(
            404, f"the model {model!r} does not exist; GET /v1/models lists them", param="model", code="model_not_found"
        )
    return model


def checked_max_tokens(server: Server, ids: list[int], max_tokens: Optional[int]) -> int:
    """The request's max_tokens, by default as many as fit up to --max_tokens, once it and the prompt are within the
    server's limits (400 otherwise)."""
    max_seq_length = server.generator.max_seq_length
    max_tokens = max_tokens or max(1, min(server.max_tokens, max_seq_length - len(ids)))
    if max_tokens > server.max_tokens:
        raise APIError(
            400,
            f"max_tokens {max_tokens} is above this server's limit of {server.max_tokens} (serve.py --max_tokens)",
            param="max_tokens",
            code="max_tokens_too_large",
        )
    if len(ids) > server.max_prompt_tokens:
        raise APIError(
            400,
            f"the prompt has {len(ids)} tokens, above this server's limit of {server.max_prompt_tokens} "
            "(serve.py --max_prompt_tokens)",
            param="prompt",
            code="prompt_too_long",
        )
    if not ids or any(not 0 <= i < server.generator.model.config.vocab_size for i in ids):
        raise APIError(400, "the prompt is empty or holds token ids outside the vocabulary", param="prompt")
    if len(ids) + max_tokens > max_seq_length:
        raise APIError(
            400,
            f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds this server's limit of "
            f"{max_seq_length} tokens (serve.py --max_seq_length)",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return max_tokens


def submit(server: Server, body: SamplingFields, adapter: str, ids: list[int], max_tokens: Optional[int]) -> "Answer":
    """Queues the request's job in the generation loop (429 when the queue is full); returns its Answer, which the
    job's tokens flow into."""
    loop = asyncio.get_running_loop()
    texts: asyncio.Queue = asyncio.Queue()
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    device = server.generator.model.embed.weight.device
    completion = Completion(
        ids,
        checked_max_tokens(server, ids, max_tokens),
        body.temperature,
        body.top_k,
        body.top_p,
        generator=None if body.seed is None else torch.Generator(device).manual_seed(body.seed),
        stop_ids=server.tokenizer.stop_ids,
        stop_strings=[stop for stop in stops if stop],
        detokenize=server.tokenizer.decode,
    )
    # from the generation thread: the text so far after each token (a str: the same object whichever thread reads it)
    completion.on_token = lambda _: loop.call_soon_threadsafe(texts.put_nowait, completion.text)
    job = Job(completion, adapter, on_end=lambda: loop.call_soon_threadsafe(texts.put_nowait, None))
    try:
        server.generator.submit(job)
    except QueueFull as e:
        raise APIError(429, f"the server is busy: {e}", type="rate_limit_error", code="queue_full") from None
    except ValueError as e:  # what checked_max_tokens lets through
        raise APIError(400, one_line(e)) from None
    return Answer(job, texts)


# Answering: streamed as server-sent events, or whole


async def respond(request: Request, body: SamplingFields, answer: "Answer", reply: "Reply"):
    """The answer as server-sent events with `stream`, else one JSON object once it has ended."""
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.get("include_usage"))
        return StreamingResponse(events(answer, reply, include_usage), media_type="text/event-stream")
    await wait_for_end(answer, request)
    if answer.job.finish_reason == "error":
        raise APIError(500, "generation failed; the server's log has the traceback", type="server_error")
    return response(reply, [choice(reply, answer.text, answer.finish_reason)], answer.usage())


async def events(answer: "Answer", reply: "Reply", include_usage: bool) -> AsyncIterator[str]:
    """A chunk per piece of text that became final, one with the finish_reason, one with the usage if asked, and
    `data: [DONE]`."""
    try:
        first = True
        while answer.finish_reason is None:
            text = answer.add(await answer.texts.get())
            if text:
                yield sse(chunk(reply, [choice(reply, text, None, delta=True, first=first)]))
                first = False
        yield sse(chunk(reply, [choice(reply, None, answer.finish_reason, delta=True)]))
        if include_usage:
            yield sse(chunk(reply, [], answer.usage()))
        yield "data: [DONE]\n\n"
    finally:  # also when the client went away: its slot is freed at the next step
        answer.job.cancelled = True


async def wait_for_end(answer: "Answer", request: Request) -> None:
    """Takes the job's tokens until the answer ends or the client goes away (looked at twice a second)."""
    loop = asyncio.get_running_loop()
    try:
        checked = loop.time()
        while answer.finish_reason is None:
            try:
                answer.add(await asyncio.wait_for(answer.texts.get(), timeout=0.5))
            except asyncio.TimeoutError:
                pass
            if loop.time() - checked > 0.5:
                checked = loop.time()
                if await request.is_disconnected():
                    break
    finally:
        answer.job.cancelled = True  # a no-op for a job that has ended; else its slot is freed at the next step


class Answer:
    """A job's answer as the generation loop hands it over in `texts` (the text so far after each token, decoded and
    cut at a stop string by decode.Completion; None once the job has ended): what may be sent so far (not what could
    still turn into a stop string), and where it ends."""

    def __init__(self, job: Job, texts: asyncio.Queue) -> None:
        self.job, self.texts = job, texts
        self.text = ""  # the answer so far (in the end, all of it)
        self.sent = 0  # characters of text handed out
        self.finish_reason: Optional[str] = None

    def add(self, text: Optional[str]) -> str:
        """Takes the next text (None: the job ended) and returns the part of it that became final."""
        if self.finish_reason is not None:
            return ""
        hold = 0
        if text is None:
            self.finish_reason = {"stop": "stop", "length": "length"}.get(self.job.finish_reason, "stop")
        else:
            self.text = text
            hold = max((len(stop) - 1 for stop in self.job.completion.stop_strings), default=0)  # a stop's start?
        end = max(self.sent, len(self.text) - hold)
        new, self.sent = self.text[self.sent : end], end
        return new

    def usage(self) -> dict:
        """Tokens of the prompt and of the answer (the stop token included), once the job has ended."""
        prompt, answer = len(self.job.completion.prompt), len(self.job.completion.tokens)
        return {"prompt_tokens": prompt, "completion_tokens": answer, "total_tokens": prompt + answer}


# OpenAI's response and chunk shapes, server-sent events, errors


@dataclass
class Reply:
    """What every piece of one answer carries: its id, the model that answers, and whether it is a chat answer."""

    id: str
    model: str
    chat: bool


def choice(
    reply: Reply, text: Optional[str], finish_reason: Optional[str], delta: bool = False, first: bool = False
) -> dict:
    """One of `choices`: a completion's text; a chat answer's message, or with `delta` a streamed piece of it (the
    role comes with the `first` piece of text only, as OpenAI sends it)."""
    if not reply.chat:
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    if delta:
        content = {} if text is None else {"content": text}
        message = {"delta": {"role": "assistant", **content} if first else content}
    else:
        message = {"message": {"role": "assistant", "content": text}}
    return {"index": 0, **message, "logprobs": None, "finish_reason": finish_reason}


def response(reply: Reply, choices: list[dict], usage: dict) -> dict:
    """A whole answer: a "text_completion" or a "chat.completion"."""
    kind = "chat.completion" if reply.chat else "text_completion"
    return {
        "id": reply.id,
        "object": kind,
        "created": int(time.time()),
        "model": reply.model,
        "choices": choices,
        "usage": usage,
    }


def chunk(reply: Reply, choices: list[dict], usage: Optional[dict] = None) -> dict:
    """A piece of a streamed answer: a "text_completion" or a "chat.completion.chunk", the last one with `usage`."""
    kind = "chat.completion.chunk" if reply.chat else "text_completion"
    data = {"id": reply.id, "object": kind, "created": int(time.time()), "model": reply.model, "choices": choices}
    return data if usage is None else {**data, "usage": usage}


def sse(data: dict) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(data)}\n\n"


def error_response(e: APIError) -> JSONResponse:
    body = {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}
    return JSONResponse(body, status_code=e.status)


async def api_error(_, e: APIError) -> JSONResponse:
    return error_response(e)


async def invalid_body(_, e: RequestValidationError) -> JSONResponse:
    """A body that is not JSON (400), or a field missing, of the wrong type or out of range (422, naming it)."""
    problem = e.errors()[0]
    if problem.get("type") == "json_invalid":
        return error_response(
            APIError(400, f"the request body is not valid JSON: {problem.get('msg')}", code="invalid_json")
        )
    where = ".".join(str(part) for part in problem.get("loc", ()) if part != "body")
    return error_response(APIError(422, f"{where}: {problem.get('msg')}", param=where or None, code="invalid_field"))


async def http_error(_, e: HTTPException) -> JSONResponse:
    return error_response(APIError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None))


if __name__ == "__main__":
    cli(main)
