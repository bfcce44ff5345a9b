"""serve.py as a real server (a subprocess on a free localhost port, a tiny random checkpoint and adapters) spoken to
with the real `openai` client: concurrent clients on different adapters, streaming and not, each answer equal to greedy
generation with that adapter alone (generate_lora.py's path, unmerged); adapters copied in while it runs; every bad
request's status code and OpenAI-shaped error; a client that disconnects mid-stream; SIGTERM."""

import http.client
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import ROOT, make_adapter
from decode import generate
from lora import load_lora_model
from tokenizer import CHAT_TEMPLATES, Tokenizer
from utils import load_model

openai = pytest.importorskip("openai")

KEY = "test-key"
ADAPTERS = [
    ("qv2", 2, 4, ("query", "value"), None),
    ("all4", 4, 8, ("all_linear",), "chatml"),
    ("head8", 8, 16, ("mlp", "head"), None),
]
LATE = ("ko1", 1, 1, ("key", "projection"), None)  # copied into the directory while the server runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, checkpoint_dir) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("made")
    paths = {}
    for seed, (name, r, alpha, targets, template) in enumerate([*ADAPTERS, LATE]):
        paths[name] = directory / f"{name}.safetensors"
        make_adapter(checkpoint_dir, paths[name], r, alpha, targets, seed, CHAT_TEMPLATES.get(template))
    return paths


@pytest.fixture(scope="module")
def server(tmp_path_factory, checkpoint_dir, adapters):
    """The running server (url, port, process, adapters dir, base name): the base, named after its directory, and
    ADAPTERS; 4 slots, 2 places in the queue, 200 positions, max_tokens 200, prompts of 50 tokens at most."""
    served = tmp_path_factory.mktemp("adapters")
    for name, *_ in ADAPTERS:
        shutil.copy(adapters[name], served / f"{name}.safetensors")
    (served / "broken.safetensors").write_text("not an adapter")
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "serve.py",
            "--checkpoint_dir",
            str(checkpoint_dir),
            "--adapters_dir",
            str(served),
            "--port",
            str(port),
            "--api_key",
            KEY,
            "--max_batch_size",
            "4",
            "--max_waiting",
            "2",
            "--max_seq_length",
            "200",
            "--max_tokens",
            "200",
            "--max_prompt_tokens",
            "50",
            "--template",
            "alpaca",
            "--shutdown_timeout",
            "5",
        ],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    server = {
        "url": f"http://127.0.0.1:{port}",
        "port": port,
        "process": process,
        "dir": served,
        "name": checkpoint_dir.name,
    }
    for _ in range(300):
        try:
            request(server, "GET", "/health")
            break
        except OSError:
            assert process.poll() is None, process.stderr.read()
            time.sleep(0.1)
    yield server
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def reference(checkpoint_dir, adapters):
    """greedy(model name, prompt ids, n) -> text: generate.generate with that adapter alone (unmerged, fp32), or the
    base, decoded without the stop token, and how many tokens it generated."""
    tokenizer = Tokenizer(checkpoint_dir)
    models = {name: load_lora_model(checkpoint_dir, path, merge=False).eval() for name, path in adapters.items()}

    def greedy(name: str, ids: list[int], n: int) -> tuple[str, int]:
        model = models.get(name) or models.setdefault(name, load_model(checkpoint_dir).eval())
        new = generate(model, torch.tensor(ids), n, temperature=0.0, stop_ids=tokenizer.stop_ids)[len(ids) :].tolist()
        return tokenizer.decode([i for i in new if i not in tokenizer.stop_ids]), len(new)

    return tokenizer, greedy


def client(server, **kwargs) -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{server['url']}/v1", api_key=KEY, max_retries=0, **kwargs)


def test_models_lists_base_and_adapters_and_picks_up_new_files(server, adapters):
    names = [model.id for model in client(server).models.list()]
    assert names == [server["name"], "all4", "head8", "qv2"]  # the broken file is skipped
    shutil.copy(adapters["ko1"], server["dir"] / ".ko1.tmp")  # as utils.atomic_path writes: a whole file appears
    (server["dir"] / ".ko1.tmp").rename(server["dir"] / "ko1.safetensors")
    answer = client(server).completions.create(model="ko1", prompt="Hello", max_tokens=3, temperature=0)
    assert answer.model == "ko1" and answer.usage.completion_tokens == 3
    assert "ko1" in [model.id for model in client(server).models.list()]


def test_concurrent_clients_on_different_adapters_get_their_greedy_answers(server, reference):
    tokenizer, greedy = reference
    jobs = []  # (model, chat?, stream?, prompt text or messages, max_tokens)
    for i, model in enumerate([server["name"], "qv2", "all4", "head8", "all4", "qv2"]):  # 4 slots + 2 waiting
        prompt = ["Hello, my name is", "The capital of France", "Once upon a time there was", "1 2 3"][i % 4]
        jobs.append((model, i % 3 == 1, i % 2 == 0, prompt, 6 + 3 * i))

    def call(job):
        model, chat, stream, prompt, n = job
        api = client(server)
        if chat:
            created = api.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=n,
                temperature=0,
                stream=stream,
                **({"stream_options": {"include_usage": True}} if stream else {}),
            )
        else:
            created = api.completions.create(
                model=model,
                prompt=prompt,
                max_tokens=n,
                temperature=0,
                stream=stream,
                **({"stream_options": {"include_usage": True}} if stream else {}),
            )
        if not stream:
            text = created.choices[0].message.content if chat else created.choices[0].text
            return text, created.usage.completion_tokens, created.choices[0].finish_reason
        text, usage, finish = "", None, None
        for event in created:
            if event.usage is not None:
                usage = event.usage.completion_tokens
            for choice in event.choices:
                text += (choice.delta.content or "") if chat else choice.text
                finish = choice.finish_reason or finish
        return text, usage, finish

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(call, jobs))
    for (model, chat, stream, prompt, n), (text, n_tokens, finish) in zip(jobs, answers):
        if chat:
            template = "chatml" if model == "all4" else "alpaca"  # all4 recorded chatml; the rest use --template
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], True, template)
            ids = tokenizer.encode(rendered, bos=False).tolist()
        else:
            ids = tokenizer.encode(prompt).tolist()
        expected, expected_n = greedy("" if model == server["name"] else model, ids, n)
        assert (text, n_tokens) == (expected, expected_n), (model, chat, stream)
        assert finish == ("length" if expected_n == n else "stop")
    assert len({text for text, _, _ in answers}) == len(answers)  # different adapters: different answers


def test_stop_strings_seed_and_top_p(server, reference):
    api = client(server)
    full = api.completions.create(model="qv2", prompt="Hello", max_tokens=12, temperature=0).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    cut = api.completions.create(model="qv2", prompt="Hello", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(
        event.choices[0].text
        for event in api.completions.create(
            model="qv2", prompt="Hello", max_tokens=12, temperature=0, stop=stop, stream=True
        )
    )
    assert streamed == full[: full.index(stop)]
    sampled = [
        api.completions.create(model="all4", prompt="Hello", max_tokens=10, temperature=1.0, top_p=0.9, seed=seed)
        .choices[0]
        .text
        for seed in (1, 1, 2)
    ]
    assert sampled[0] == sampled[1] != sampled[2]


def request(server, method: str, path: str, body=None, key: str = KEY) -> tuple[int, dict]:
    """A plain HTTP request (no client library in between): the status and the JSON body."""
    connection = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=30)
    try:
        content = body if body is None or isinstance(body, str) else json.dumps(body)
        connection.request(
            method, path, body=content, headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        )
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


@pytest.mark.parametrize(
    "path, body, key, status, code, message",
    [
        (
            "/v1/completions",
            {"model": "qv2", "prompt": "Hi", "max_tokens": 201},
            KEY,
            400,
            "max_tokens_too_large",
            "max_tokens 201 is above this server's limit of 200",
        ),
        (
            "/v1/completions",
            {"model": "qv2", "prompt": "word " * 60},
            KEY,
            400,
            "prompt_too_long",
            "above this server's limit of 50",
        ),
        (
            "/v1/completions",
            {"model": "qv2", "prompt": "word " * 40, "max_tokens": 190},
            KEY,
            400,
            "context_length_exceeded",
            "plus max_tokens (190) exceeds this server's limit of 200 tokens",
        ),
        (
            "/v1/completions",
            {"model": "nope", "prompt": "Hi"},
            KEY,
            404,
            "model_not_found",
            "the model 'nope' does not exist",
        ),
        ("/v1/completions", '{"model": "qv2", "prompt": ', KEY, 400, "invalid_json", "not valid JSON"),
        (
            "/v1/completions",
            {"model": "qv2", "prompt": "Hi", "temperature": -1},
            KEY,
            422,
            "invalid_field",
            "temperature",
        ),
        (
            "/v1/chat/completions",
            {"model": "qv2", "messages": [{"role": "robot", "content": "Hi"}]},
            KEY,
            422,
            "invalid_field",
            "messages.0.role",
        ),
        ("/v1/chat/completions", {"model": "qv2"}, KEY, 422, "invalid_field", "messages: Field required"),
        ("/v1/completions", {"model": "qv2", "prompt": "Hi"}, "wrong", 401, "invalid_api_key", "API key"),
    ],
)
def test_bad_requests_get_their_status_and_an_openai_error(server, path, body, key, status, code, message):
    got, answer = request(server, "POST", path, body, key)
    assert got == status
    error = answer["error"]
    assert error["code"] == code and message in error["message"] and error["type"]
    if status in (400, 404, 422):  # and the openai client raises its matching exception
        kind = {400: openai.BadRequestError, 404: openai.NotFoundError, 422: openai.UnprocessableEntityError}[status]
        if isinstance(body, dict) and key == KEY:
            with pytest.raises(kind):
                client(server).post(path.removeprefix("/v1"), body=body, cast_to=object)


def test_a_full_queue_answers_429_and_a_disconnect_frees_the_slot(server):
    # 4 slots and 2 places in the queue: of 12 long requests sent at once, some are refused
    def call(_):
        body = {"model": "all4", "prompt": "Hi", "max_tokens": 190, "temperature": 0}
        return request(server, "POST", "/v1/completions", body)

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(call, range(12)))
    statuses = [status for status, _ in answers]
    assert statuses.count(200) >= 6 and 429 in statuses and set(statuses) == {200, 429}
    refused = next(answer for status, answer in answers if status == 429)["error"]
    assert refused["code"] == "queue_full" and "requests are already waiting" in refused["message"]
    assert call(0)[0] == 200  # and serves on after refusing

    before = request(server, "GET", "/health")[1]["ended"].get("cancelled", 0)
    connection = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=30)
    body = {"model": "qv2", "prompt": "Hi", "max_tokens": 190, "stream": True, "temperature": 0}
    connection.request(
        "POST",
        "/v1/completions",
        json.dumps(body),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    response = connection.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")  # the first token has come
    connection.close()  # and the client goes away
    for _ in range(50):
        health = request(server, "GET", "/health")[1]
        if health["ended"].get("cancelled", 0) > before and health["running"] == 0:
            break
        time.sleep(0.1)
    assert health["ended"].get("cancelled", 0) == before + 1 and health["running"] == 0
    assert client(server).completions.create(model="qv2", prompt="Hi", max_tokens=2).usage.completion_tokens == 2


def test_sigterm_finishes_the_request_in_flight_and_exits_cleanly(server):
    api = client(server)
    stream = api.completions.create(model="head8", prompt="Hi", max_tokens=100, temperature=0, stream=True)
    events = iter(stream)
    first = next(events)
    server["process"].send_signal(signal.SIGTERM)
    rest = list(events)
    assert rest[-1].choices[0].finish_reason in ("length", "stop") and first.choices[0].text is not None
    assert server["process"].wait(timeout=20) == 0
