"""``deepseek-v3 serve``: transformers' own server on the plugin's classes, driven by the ``openai`` client on
127.0.0.1 -- chat completions, completions and the Responses API, streamed and not, concurrent requests, greedy
answers equal to the plugin's own ``generate()`` on the same tokens, bad requests answered with an HTTP error
while the server keeps serving. Plus the launcher's refusals (missing extras, not a checkpoint, port in use,
bad option), each one line with nothing left running.

One server process (and the model process it spawns) serves the whole module, started before the reference
answers are computed so the two overlap; its process group is killed in the fixture's teardown.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import inspect
import json
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

import modeling_deepseekv3 as ds
from helpers import ROOT
from modeling_deepseekv3.cli import main as cli

_MISSING = [m for m in ("fastapi", "uvicorn", "openai", "pydantic") if importlib.util.find_spec(m) is None]
if _MISSING:
    pytest.skip(
        f"transformers' serving extras are not installed ({', '.join(_MISSING)}): pip install 'transformers[serving]'",
        allow_module_level=True,
    )

import openai  # noqa: E402

MODEL = ROOT / "models" / "shakespeare-deepseek-v3"
MODEL_ID = str(MODEL)  # the server is pinned to DIR as given; requests name it so
MAX_TOKENS = 12
CHAT_PROMPTS = (
    "Speak of the king.",
    "What says the queen?",
    "Good morrow, my lord.",
    "Where is the sword?",
    "Who comes here?",
    "Tell me of Rome.",
    "How fares the duke?",
    "What news abroad?",
)
COMPLETION_PROMPT = "To be, or not to be"
READY_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (the server, its model process, multiprocessing's tracker), then
    SIGKILL to whatever of the group is left."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


@pytest.fixture(scope="module", params=["generate", "continuous-batching"])
def server(request, tmp_path_factory):
    """``deepseek-v3 serve MODEL --host 127.0.0.1 --port P --device cpu --dtype float32`` in its own session, one
    ``generate()`` per request or (``--continuous-batching``) every request in transformers' running batch on the
    paged latent cache: each test runs against both."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    command = [sys.executable, "-m", "modeling_deepseekv3", "serve", MODEL_ID, "--host", "127.0.0.1"]
    command += ["--port", str(port), "--device", "cpu", "--dtype", "float32"]
    if request.param == "continuous-batching":
        command.append("--continuous-batching")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        yield {"proc": proc, "port": port, "log": log, "mode": request.param}
    finally:
        _kill_group(proc)


@pytest.fixture(scope="module")
def reference(server):
    """The plugin's own greedy ``generate()`` (fp32, as served) on exactly the tokens the server builds: the chat
    template with the generation prompt for chats, the plain tokenizer call for completions. Computed while the
    server starts (this fixture depends on it being launched, not ready)."""
    model = ds.DeepseekV3ForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    tok = ds.load_tokenizer(MODEL)

    def answer(enc) -> dict:
        out = model.generate(**enc, max_new_tokens=MAX_TOKENS, do_sample=False)
        new = out[0, enc["input_ids"].shape[1] :]
        return {
            "text": tok.decode(new, skip_special_tokens=True),
            "prompt_tokens": enc["input_ids"].shape[1],
            "completion_tokens": len(new),
        }

    chats = {}
    for prompt in CHAT_PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
        # the same tokens as `deepseek-v3 generate --chat` (template text, then no special tokens added)
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert tok(text, add_special_tokens=False).input_ids == enc["input_ids"][0].tolist()
        assert enc["input_ids"][0, 0] == tok.bos_token_id and (enc["input_ids"][0] == tok.bos_token_id).sum() == 1
        chats[prompt] = answer(enc)
    completion = answer(tok(COMPLETION_PROMPT, return_tensors="pt"))
    return {"chat": chats, "completion": completion}


@pytest.fixture(scope="module")
def client(server, reference):
    """An OpenAI client on the server, once ``/health`` answers (the model has loaded)."""
    proc, port = server["proc"], server["port"]
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}:\n{server['log'].read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"the server was not ready in {READY_TIMEOUT_S} s:\n{server['log'].read_text()[-4000:]}")
        time.sleep(0.5)
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=300)


def _chat(client, prompt: str, stream: bool = False):
    return client.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=stream,
    )


def _streamed_chat(client, prompt: str) -> list[str]:
    return [
        c.choices[0].delta.content
        for c in _chat(client, prompt, stream=True)
        if c.choices and c.choices[0].delta.content
    ]


# ----------------------------------------------------------------------------------------- the server


@pytest.mark.slow
def test_served_model_is_the_plugin_with_fp8_weights(client, server):
    """The model process says what it loaded: the plugin's class, with FP8 weights (transformers-native cannot load
    this checkpoint on CPU at all, so a served answer alone already rules it out)."""
    assert [m.id for m in client.models.list().data] == [MODEL_ID]
    log = server["log"].read_text()
    assert f"http://127.0.0.1:{server['port']} answers once the model has loaded" in log
    loaded = re.search(
        r"deepseek-v3 serve: loaded .* as (\S+); ([\d.]+) MiB of its ([\d.]+) MiB of weights are FP8", log
    )
    assert loaded, log[-4000:]
    assert loaded.group(1) == "modeling_deepseekv3.modeling.DeepseekV3ForCausalLM"
    assert float(loaded.group(2)) > 0


@pytest.mark.slow
def test_chat_completion_equals_generate_streamed_and_not(client, reference):
    prompt = CHAT_PROMPTS[0]
    expected = reference["chat"][prompt]
    response = _chat(client, prompt)
    assert response.choices[0].message.content == expected["text"]
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (
        expected["prompt_tokens"],
        expected["completion_tokens"],
    )
    chunks = _streamed_chat(client, prompt)
    assert len(chunks) > 1 and "".join(chunks) == expected["text"]


@pytest.mark.slow
def test_completion_equals_generate_streamed_and_not(client, reference):
    """/v1/completions tokenizes the prompt as it is (this tokenizer adds no BOS), no chat template."""
    expected = reference["completion"]
    response = client.completions.create(model=MODEL_ID, prompt=COMPLETION_PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    assert response.choices[0].text == expected["text"]
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (
        expected["prompt_tokens"],
        expected["completion_tokens"],
    )
    stream = client.completions.create(
        model=MODEL_ID, prompt=COMPLETION_PROMPT, max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    chunks = [c.choices[0].text for c in stream if c.choices and c.choices[0].text]
    assert len(chunks) > 1 and "".join(chunks) == expected["text"]


@pytest.mark.slow
def test_responses_api_equals_generate(client, reference):
    response = client.responses.create(
        model=MODEL_ID, input=CHAT_PROMPTS[0], max_output_tokens=MAX_TOKENS, temperature=0
    )
    assert response.output_text == reference["chat"][CHAT_PROMPTS[0]]["text"]


@pytest.mark.slow
def test_eight_concurrent_requests_each_equal_its_own_generate(client, reference):
    """Eight requests at once, half streamed: each answer is its prompt's own, none mixed with another's."""

    def ask(i: int) -> str:
        prompt = CHAT_PROMPTS[i]
        if i % 2:
            return "".join(_streamed_chat(client, prompt))
        return _chat(client, prompt).choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(len(CHAT_PROMPTS)) as pool:
        answers = list(pool.map(ask, range(len(CHAT_PROMPTS))))
    assert answers == [reference["chat"][p]["text"] for p in CHAT_PROMPTS]
    assert len(set(answers)) > 1  # the prompts give different answers: a mix-up would show


@pytest.mark.slow
def test_bad_requests_get_http_errors_and_the_server_keeps_serving(client, server, reference):
    too_long = "the king " * 600  # > max_position_embeddings = 1024 tokens
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL_ID, prompt=too_long, max_tokens=4, temperature=0)
    assert caught.value.status_code == 400 and "1024" in json.dumps(caught.value.body)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": too_long}], max_tokens=4, temperature=0
        )
    assert caught.value.status_code == 400
    with pytest.raises(openai.BadRequestError) as caught:  # fits the prompt check, not with the answer
        client.completions.create(model=MODEL_ID, prompt="the king " * 100, max_tokens=1000, temperature=0)
    # each mode refuses it in its own words: the batch's request check, or generate()'s
    refusal = "plus max_new_tokens (1000) make" if server["mode"] == "continuous-batching" else "tokens to generate"
    assert caught.value.status_code == 400 and refusal in json.dumps(caught.value.body)
    with pytest.raises(openai.BadRequestError):  # refused: a 400, not a dead engine
        client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}], max_tokens=-3)
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "hi"}], max_tokens=4, extra_body={"no_such": 1}
        )
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="another/model", messages=[{"role": "user", "content": "hi"}])
    assert _chat(client, CHAT_PROMPTS[0]).choices[0].message.content == reference["chat"][CHAT_PROMPTS[0]]["text"]
    assert server["proc"].poll() is None


# ---------------------------------------------------------------------------- the launcher's refusals


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("deepseek-v3 serve: error: ")
    return err[0]


def test_missing_serving_extras_say_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # what an environment without the extra gives
    monkeypatch.delitem(sys.modules, "modeling_deepseekv3.integrations.serve", raising=False)
    assert cli(["serve", MODEL_ID]) == 2
    line = _one_error_line(capsys)
    assert "fastapi is not installed" in line and 'pip install "transformers[serving]"' in line


@pytest.mark.parametrize("case", ["missing", "no_config", "other_model", "no_tokenizer"])
def test_not_a_checkpoint_is_refused(case, tmp_path, capsys):
    target = tmp_path / "dir"
    if case != "missing":
        target.mkdir()
    if case in ("other_model", "no_tokenizer"):
        config = json.loads((MODEL / "config.json").read_text())
        if case == "other_model":
            config["model_type"] = "llama"
        (target / "config.json").write_text(json.dumps(config))
        (target / "model.safetensors").symlink_to(MODEL / "model.safetensors")
    assert cli(["serve", str(target), "--port", str(_free_port())]) == 2
    line = _one_error_line(capsys)
    expected = {
        "missing": "is not a directory",
        "no_config": "no config.json",
        "other_model": "model_type 'llama'",
        "no_tokenizer": "no tokenizer files",
    }[case]
    assert expected in line and str(target) in line
    assert multiprocessing.active_children() == []


def test_port_in_use_is_refused_before_anything_starts(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        t0 = time.monotonic()
        assert cli(["serve", MODEL_ID, "--port", str(port)]) == 2  # no --host: the default, 127.0.0.1
    line = _one_error_line(capsys)
    assert f"port {port} on 127.0.0.1 is in use" in line and "--port" in line
    assert multiprocessing.active_children() == []  # no model process was started
    assert time.monotonic() - t0 < 60  # refused at once, not after loading the model


def test_bad_option_is_one_line(capsys):
    assert cli(["serve", MODEL_ID, "--no-such-option", "1"]) == 2
    assert "No such option: --no-such-option" in _one_error_line(capsys)


def test_transformers_serve_seams_unchanged():
    """The launcher overrides these public methods of transformers serve (written against transformers 5.25); an
    upgrade that changes one fails here, naming it, rather than in a served request."""
    import transformers
    from transformers.cli.serve import Serve
    from transformers.cli.serving import model_manager

    expected = {
        model_manager.ModelLoader.load_config: ("self", "model_id"),
        model_manager.ModelLoader.load_processor: ("self", "model_id"),
        model_manager.ModelLoader.load_model_and_processor: ("self", "model_id", "on_progress"),
        Serve.run: ("self", "socket", "engine_connection"),
        Serve.run_api_servers: ("self", "count"),
    }
    for method, parameters in expected.items():
        found = tuple(inspect.signature(method).parameters)
        assert found == parameters, f"transformers {transformers.__version__} changed {method.__qualname__}: {found}"
    assert inspect.ismodule(model_manager.transformers)  # the module object its loader resolves architectures on
