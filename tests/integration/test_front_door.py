"""The front door: generate() features, pipeline(), the three loading routes, tokenizer and chat template,
CLI generate/chat, and the examples."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from transformers import TextIteratorStreamer, TextStreamer, pipeline

import modeling_deepseekv3 as ds
from helpers import ROOT, input_ids, load, native_from
from modeling_deepseekv3.cli import main as cli
from modeling_deepseekv3.integrations.tokenizer import CHAT_TEMPLATE

HUB = ROOT / "hub_config"


@pytest.fixture(scope="module")
def model(tiny_fp8):
    return load(tiny_fp8)


@pytest.fixture(scope="module")
def tok(tiny_fp8):
    return ds.load_tokenizer(tiny_fp8)


@pytest.fixture(scope="module")
def native(tiny_fp8, tmp_path_factory):
    return native_from(load(tiny_fp8), tmp_path_factory.mktemp("native"))


# ------------------------------------------------------------------------------------- generate()


@pytest.mark.parametrize(
    "extra", [{}, {"repetition_penalty": 1.3}, {"num_beams": 3}], ids=["greedy", "rep_penalty", "beam"]
)
def test_generation_equals_transformers_native(model, native, extra):
    ids = input_ids(2, 7)
    kw = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, **extra)
    assert torch.equal(model.generate(ids, **kw), native.generate(ids, **kw))


def test_sampling_is_seeded_and_respects_top_k(model):
    ids = input_ids(1, 5)
    kw = dict(max_new_tokens=15, do_sample=True, temperature=0.7, top_p=0.9, top_k=5)
    torch.manual_seed(1)
    a = model.generate(ids, **kw)
    torch.manual_seed(1)
    b = model.generate(ids, **kw)
    assert torch.equal(a, b)
    # top_k=1 sampling is greedy
    greedy = model.generate(ids, max_new_tokens=15, min_new_tokens=15, do_sample=False)
    torch.manual_seed(2)
    assert torch.equal(model.generate(ids, max_new_tokens=15, min_new_tokens=15, do_sample=True, top_k=1), greedy)


def test_stop_strings(model, tok):
    prompt = tok("The sea is", return_tensors="pt")
    full = model.generate(**prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    text = tok.decode(full[0, prompt.input_ids.shape[1] :])
    stop = text[6:10]
    assert len(stop.strip()) > 0
    out = model.generate(**prompt, max_new_tokens=20, do_sample=False, stop_strings=[stop], tokenizer=tok)
    short = tok.decode(out[0, prompt.input_ids.shape[1] :])
    assert out.shape[1] < full.shape[1] and stop in short and text.startswith(short)


def test_streaming(model, tok):
    prompt = tok("Hello", return_tensors="pt")
    pieces = []
    streamer = TextStreamer(tok, skip_prompt=True)
    streamer.on_finalized_text = lambda text, stream_end=False: pieces.append(text)
    out = model.generate(**prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False, streamer=streamer)
    assert "".join(pieces) == tok.decode(out[0, prompt.input_ids.shape[1] :])
    it = TextIteratorStreamer(tok, skip_prompt=True)
    worker = threading.Thread(
        target=model.generate, kwargs=dict(**prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False, streamer=it)
    )
    worker.start()
    streamed = "".join(it)
    worker.join()
    assert streamed == "".join(pieces)


def test_too_long_generation_is_a_clear_error(model):
    ids = input_ids(1, 500)
    with pytest.raises(ValueError, match=r"more than this model's max_position_embeddings \(512\)"):
        model.generate(ids, max_new_tokens=20)


# ------------------------------------------------------------------------------------- pipeline, tokenizer


def test_pipeline_text_and_chat(model, tok):
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    text = pipe("The sea is", max_new_tokens=8, min_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text.startswith("The sea is") and len(text) > len("The sea is")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    out = pipe(messages, max_new_tokens=8, min_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert out[:2] == messages and out[-1]["role"] == "assistant"
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")
    ref = model.generate(**ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert out[-1]["content"] == tok.decode(ref[0, ids.input_ids.shape[1] :], skip_special_tokens=True)


def test_tiny_tokenizer_matches_the_model(tok, model):
    assert len(tok) <= model.config.vocab_size
    assert (tok.bos_token_id, tok.eos_token_id) == (model.config.bos_token_id, model.config.eos_token_id)
    assert tok.convert_tokens_to_ids("<｜User｜>") != tok.unk_token_id
    assert tok.decode(tok("Hello, world! 42").input_ids) == "Hello, world! 42"


OFFICIAL_CHAT = (
    "<｜begin▁of▁sentence｜>You are a helpful assistant.<｜User｜>What is the weather in Paris?"
    "<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
    '{"city": "Paris"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜>'
    "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>15°C, sunny<｜tool▁output▁end｜><｜tool▁outputs▁end｜>"
    "It is 15°C and sunny.<｜end▁of▁sentence｜><｜User｜>Thanks! And 2+2?<｜Assistant｜>"
)
CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}],
    },
    {"role": "tool", "content": "15°C, sunny"},
    {"role": "assistant", "content": "It is 15°C and sunny."},
    {"role": "user", "content": "Thanks! And 2+2?"},
]


def test_real_tokenizer_and_official_chat_format():
    tok = ds.deepseek_v3_tokenizer()
    assert (tok.bos_token_id, tok.eos_token_id, tok.convert_tokens_to_ids("<｜Assistant｜>")) == (0, 1, 128804)
    assert tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True) == OFFICIAL_CHAT
    simple = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>greet</think>Hello!"}]
    assert tok.apply_chat_template(simple, tokenize=False) == (
        "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜>Hello!<｜end▁of▁sentence｜>"
    )
    ids = tok(OFFICIAL_CHAT, add_special_tokens=False).input_ids
    assert ids[0] == 0 and 128803 in ids and ids[-1] == 128804


@pytest.mark.parametrize(
    "conversation",
    [
        CONVERSATION,
        [{"role": "system", "content": "A"}, {"role": "system", "content": "B"}, {"role": "user", "content": "q"}],
        [
            {"role": "user", "content": "x"},
            {
                "role": "assistant",
                "content": "calling",
                "tool_calls": [
                    {"type": "function", "function": {"name": "f", "arguments": "{}"}},
                    {"type": "function", "function": {"name": "g", "arguments": "{}"}},
                ],
            },
            {"role": "tool", "content": "r"},
            {"role": "tool", "content": "s"},
        ],
    ],
    ids=["tools", "two_systems", "parallel_calls_open"],
)
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_our_template_renders_like_the_official(conversation, generation_prompt):
    tok = ds.deepseek_v3_tokenizer()
    official = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=generation_prompt)
    ours = tok.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=generation_prompt, chat_template=CHAT_TEMPLATE
    )
    assert ours == official


# ------------------------------------------------------------------------------------- loading routes


def run_route(route: str, path: Path, *extra: str) -> dict:
    env = {**os.environ, "HF_MODULES_CACHE": str(path.parent / "modules"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("_routes.py")), route, str(path), *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def official_checkout(tiny_fp8, tmp_path_factory):
    """A tiny checkpoint whose config.json carries the official auto_map, with stand-ins for DeepSeek's own
    remote-code files."""
    path = tmp_path_factory.mktemp("routes") / "ckpt"
    shutil.copytree(tiny_fp8, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["auto_map"] = json.loads((HUB / "deepseek-v3" / "config.json").read_text())["auto_map"]
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in ("configuration_deepseek.py", "modeling_deepseek.py"):
        (path / name).write_text("# DeepSeek's original file\n")
    return path


@pytest.mark.slow  # three fresh processes
def test_three_routes_load_our_model_and_agree(official_checkout, tmp_path):
    assert cli(["install-hub-files", str(official_checkout)]) == 0
    assert (official_checkout / "modeling_deepseek.py.orig").read_text() == "# DeepSeek's original file\n"
    by_class = run_route("class", official_checkout)
    registered = run_route("register", official_checkout)
    remote = run_route("remote", official_checkout, str(tmp_path / "resaved"))
    for report in (by_class, registered, remote):
        assert report["is_ours"] and report["fp8"] == "torch.float8_e4m3fn"
        assert report["chat"] == by_class["chat"] and report["text"] == by_class["text"]
    assert registered["config_class"] == "DeepseekV3PluginConfig"
    assert remote["config_class"] == "DeepseekV3RemoteConfig" and remote["model_class"].startswith(
        "transformers_modules"
    )
    # a checkpoint saved from the remote-code route still carries the shims and the official format
    saved = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert saved["quantization_config"]["quant_method"] == "fp8" and "AutoModelForCausalLM" in saved["auto_map"]
    assert (tmp_path / "resaved" / "modeling_deepseek.py").exists()


def test_without_register_the_native_mapping_is_untouched(official_checkout):
    report = run_route("native", official_checkout)
    assert report["config_class"] == "DeepseekV3Config"
    assert report["model_module"].startswith("transformers.models.deepseek_v3")


def test_register_claims_kimi_k2_but_not_deepseek_v3(tiny_bf16_direct_q, tmp_path):
    path = tmp_path / "kimi"
    shutil.copytree(tiny_bf16_direct_q, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "kimi_k2"
    (path / "config.json").write_text(json.dumps(cfg))
    report = run_route("kimi", path)
    assert report["config_class"] == "KimiK2Config" and report["model_class"] == "KimiK2ForCausalLM"
    assert report["native_still_native"].startswith("transformers.models.deepseek_v3")


# ------------------------------------------------------------------------------------- CLI and examples


def test_cli_generate_streams_and_reports(tiny_fp8, capsys):
    assert cli(["generate", str(tiny_fp8), "--prompt", "Hello", "--chat", "--max-new-tokens", "10"]) == 0
    out = capsys.readouterr().out
    assert "tokens/s" in out and "B/token/layer" in out
    assert (
        cli(
            [
                "generate",
                str(tiny_fp8),
                "--prompt",
                "Hello",
                "--max-new-tokens",
                "10",
                "--mtp",
                "--num-speculative-tokens",
                "2",
            ]
        )
        == 0
    )
    assert "MTP k=2: acceptance" in capsys.readouterr().out


def test_cli_chat(tiny_fp8, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello!\n/reset\nAgain\n/exit\n"))
    assert cli(["chat", str(tiny_fp8), "--max-new-tokens", "6", "--temperature", "0.8", "--top-p", "0.9"]) == 0
    out = capsys.readouterr().out
    assert out.count("assistant> ") == 2 and out.count("tokens/s") == 2


def test_cli_rejects_a_tokenizer_larger_than_the_model(tiny_fp8, tmp_path):
    path = tmp_path / "no-tok"
    shutil.copytree(tiny_fp8, path, ignore=shutil.ignore_patterns("tokenizer*", "chat_template*"))
    assert cli(["generate", str(path), "--prompt", "x"]) == 2  # falls back to the 128K tokenizer: refused


@pytest.mark.slow  # a training run in a fresh process
def test_finetune_example_learns(tmp_path):
    source = ROOT / "examples" / "finetune_lora.py"
    assert len(source.read_text().splitlines()) <= 100
    proc = subprocess.run(
        [sys.executable, str(source), "--model", str(tmp_path / "tiny"), "--output", str(tmp_path / "adapter")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(
        line.split(":", 1) for line in proc.stdout.splitlines() if line.startswith(("before", "after", "loss"))
    )
    first, last = (float(v) for v in lines["loss"].split("(")[0].split("->"))
    assert last < 0.5 * first
    assert lines["before"].strip() != lines["after"].strip()
    assert (tmp_path / "adapter" / "adapter_config.json").exists()


@pytest.mark.slow  # a fresh process per example
@pytest.mark.parametrize("script,stdin", [("generate.py", None), ("chat.py", "Hello!\nHow are you?\n/exit\n")])
def test_examples_run(script, stdin, tmp_path, tiny_fp8):
    """generate.py runs on the shipped model (its default) and on any official checkout; chat.py on a tiny one."""
    source = ROOT / "examples" / script
    assert len(source.read_text().splitlines()) <= 100
    runs = [[]] if script == "generate.py" else []
    runs.append(["--model", str(tiny_fp8 if script == "generate.py" else tmp_path / "tiny")])
    for extra in runs:
        proc = subprocess.run(
            [sys.executable, str(source), "--max-new-tokens", "12", *extra],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        if script == "generate.py":
            assert "tokens/s" in proc.stdout and "with MTP" in proc.stdout and "acceptance" in proc.stdout
        else:
            assert "assistant" in proc.stdout and "[2 replies]" in proc.stdout


def test_one_prompt_one_token_sequence_in_every_entry_point(capsys):
    """The CLI used to put BOS before a plain prompt while pipeline(), lm-eval, the examples and the card's
    snippet did not (the shipped model's tokenizer adds none, and training had none): the same prompt gave
    different text. Now every route tokenizes a plain prompt as ``tok(prompt)`` does."""
    shipped = ROOT / "models" / "shakespeare-deepseek-v3"
    prompt = "Now is the winter of our discontent"
    model = ds.DeepseekV3ForCausalLM.from_pretrained(shipped, dtype=torch.float32)
    tok = ds.load_tokenizer(shipped)
    ids = tok(prompt, return_tensors="pt").input_ids
    greedy = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1] :]
    expected = tok.decode(greedy, skip_special_tokens=True)
    piped = pipeline("text-generation", model=model, tokenizer=tok)(
        prompt, max_new_tokens=12, do_sample=False, return_full_text=False
    )[0]["generated_text"]
    assert piped == expected
    assert cli(["generate", str(shipped), "--prompt", prompt, "--max-new-tokens", "12", "--dtype", "float32"]) == 0
    assert capsys.readouterr().out.startswith(expected)
