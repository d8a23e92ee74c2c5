"""``deepseek-v3 serve DIR [options]``: transformers' own ``transformers serve`` on this package's classes.

Why a launcher and not a server of our own: ``transformers serve`` already has the OpenAI-compatible endpoints
(``/v1/chat/completions``, ``/v1/completions``, ``/v1/responses``, ``/v1/models``, ``/health``), streaming,
cancellation, its own options and its own upgrades. What it lacks is a way to reach this package: it loads the
model in a process of its own, started with multiprocessing's "spawn" (a fresh interpreter that imports only what
unpickling its arguments needs, so a ``register()`` done in the launching process does not exist there), and it
picks the class by ``getattr(transformers, config.architectures[0])``, which ignores both Auto-class registrations
and ``auto_map``. For our checkpoints that is transformers' native ``DeepseekV3ForCausalLM``, which cannot load a
partial-block FP8 checkpoint on CPU at all.

How our classes reach every process: the launcher runs transformers' ``Serve`` command (:class:`PluginServe`, a
subclass that changes nothing of its options) with :class:`PluginModelLoader` as its model loader. transformers
hands that loader, pickled, to every process it spawns (the model's process, and the API servers of
``--api-server-count``); unpickling it imports this module there, and each of its loading methods calls
``register(override_native=True)`` first. While the model loads, the checkpoint's architecture name resolves to
``AutoModelForCausalLM``, which honours that registration; the name is restored right after. Nothing is patched
at import time.

Everything after DIR goes to transformers' option parser unchanged (``deepseek-v3 serve DIR --help`` lists the
options). One default differs: ``--host`` is 127.0.0.1 (loopback only), never a wider address unless asked. The
address is bound before the model loads, so a port in use fails at once with nothing left running.

This module needs transformers' serving extras (``pip install "transformers[serving]"``) and says so on import.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import json
import socket
import sys
from pathlib import Path

#: what ``transformers[serving]`` adds and ``transformers serve`` imports (transformers checks the same four)
SERVING_MODULES = ("fastapi", "uvicorn", "openai", "pydantic")
INSTALL_HINT = 'pip install "transformers[serving]"'


def missing_serving_modules() -> list[str]:
    """The serving extras that do not import here (an import, not a metadata look-up: a broken install counts)."""
    missing = []
    for name in SERVING_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


if _missing := missing_serving_modules():
    raise ImportError(
        f"serving needs transformers' serving extras, and {', '.join(_missing)} "
        f"{'is' if len(_missing) == 1 else 'are'} not installed: {INSTALL_HINT}"
    )

import typer  # noqa: E402  (after the check above: its message is the one a user without the extras sees)
from transformers.cli.serve import Serve  # noqa: E402
from transformers.cli.serving import model_manager as _transformers_model_manager  # noqa: E402
from transformers.cli.serving.model_manager import ModelLoader  # noqa: E402

from ..checkpoint.load import check_local_checkout  # noqa: E402
from ..core.configuration import DeepseekV3PluginConfig, KimiK2Config  # noqa: E402
from ..registration import register  # noqa: E402

__all__ = ["DEFAULT_HOST", "PluginModelLoader", "PluginServe", "check_checkpoint", "listening_socket", "serve"]

DEFAULT_HOST = "127.0.0.1"
#: the ``architectures`` names our checkpoints carry (Kimi-K2's official config.json says DeepseekV3ForCausalLM too)
PLUGIN_ARCHITECTURES = ("DeepseekV3ForCausalLM", "KimiK2ForCausalLM")
MODEL_TYPES = (DeepseekV3PluginConfig.model_type, KimiK2Config.model_type)


def check_checkpoint(directory: str) -> None:
    """Refuse, with the reason, a DIR the server could not serve, before anything starts: a missing directory, one
    without a DeepSeek-V3-family config.json, safetensors weights or the tokenizer the server formats prompts with."""
    path = Path(directory)
    if not path.is_dir():
        raise ValueError(
            f"{directory} is not a directory: deepseek-v3 serve serves a local checkpoint directory "
            "(for a Hub model, download it first: hf download REPO --local-dir DIR)."
        )
    check_local_checkout(str(path))  # config.json present, valid, sized; no pickle-only weights
    model_type = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"{path / 'config.json'} has model_type {model_type!r}: deepseek-v3 serve serves DeepSeek-V3-family "
            f"checkpoints ({', '.join(MODEL_TYPES)}); serve other models with transformers serve itself."
        )
    if not any(path.glob("*.safetensors")):
        raise ValueError(f"{path} holds no *.safetensors weights, so it is not a checkpoint this package loads.")
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()):
        raise ValueError(
            f"{path} has no tokenizer files (tokenizer.json / tokenizer_config.json): the server tokenizes prompts "
            "and renders chats with the checkpoint's own tokenizer. Put them beside the weights."
        )


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` the way uvicorn binds one (IPv6 for a host with a colon, SO_REUSEADDR so a
    port a stopped server left in TIME_WAIT is free), for transformers' ``Serve.run`` to listen on. Binding before
    the model loads turns a port in use into an error at once, and holding the socket until uvicorn listens on it
    leaves no window for another process to take the port meanwhile."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OverflowError:
        sock.close()
        raise ValueError(f"--port must be between 0 and 65535, got {port}.") from None
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ValueError(
                f"port {port} on {host} is in use (another server is listening there): stop it, or pick another "
                "port with --port."
            ) from None
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}.") from None
    return sock


@contextlib.contextmanager
def _architectures_through_auto_class():
    """For the duration of transformers' model loading, ``getattr(transformers, "DeepseekV3ForCausalLM")`` (and
    Kimi-K2's name) gives ``AutoModelForCausalLM``, whose ``from_pretrained`` picks the class registered for the
    checkpoint's config class: ours. The attribute is set on the very module object transformers' loader reads
    (importing this package can make ``sys.modules["transformers"]`` a fresh copy: transformers'
    ``direct_transformers_import`` re-executes its ``__init__``), and restored afterwards."""
    from transformers import AutoModelForCausalLM

    module = _transformers_model_manager.transformers
    saved = {name: module.__dict__[name] for name in PLUGIN_ARCHITECTURES if name in module.__dict__}
    for name in PLUGIN_ARCHITECTURES:
        setattr(module, name, AutoModelForCausalLM)
    try:
        yield
    finally:
        for name in PLUGIN_ARCHITECTURES:
            if name in saved:
                setattr(module, name, saved[name])
            else:  # never resolved before: the lazy module resolves it again on the next access
                module.__dict__.pop(name, None)


def _loaded_line(model, model_id: str) -> str:
    """What the server logs once the model is in: its class (ours, or an error) and how much of it is FP8."""
    import torch
    import transformers

    from ..modeling import DeepseekV3ForCausalLM

    cls = type(model)
    if not isinstance(model, DeepseekV3ForCausalLM):
        raise RuntimeError(
            f"transformers {transformers.__version__} loaded {model_id} as {cls.__module__}.{cls.__qualname__}, not "
            "as modeling_deepseekv3's class: its serve loader changed since transformers 5.25, which this launcher "
            "was written for."
        )
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}.values()
    total = sum(t.numel() * t.element_size() for t in tensors)
    fp8 = sum(t.numel() * t.element_size() for t in tensors if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2))
    return (
        f"deepseek-v3 serve: loaded {model_id} as {cls.__module__}.{cls.__qualname__}; "
        f"{fp8 / 2**20:.1f} MiB of its {total / 2**20:.1f} MiB of weights are FP8."
    )


class PluginModelLoader(ModelLoader):
    """transformers serve's model loader, loading this package's classes in whichever process it runs: each
    loading method registers them first (see the module docstring). Same settings and state as the loader it is
    made from (:meth:`from_loader`), so every option of ``transformers serve`` keeps its meaning."""

    @classmethod
    def from_loader(cls, loader: ModelLoader) -> PluginModelLoader:
        """The same loader, made ours (its settings copied as they are: nothing is parsed or validated twice)."""
        if isinstance(loader, cls):
            return loader
        plugin = cls.__new__(cls)
        plugin.__dict__.update(vars(loader))
        return plugin

    def load_config(self, model_id: str):
        register(override_native=True)  # the API server reads the config as ours too (context length, EOS)
        return super().load_config(model_id)

    def load_processor(self, model_id: str):
        register(override_native=True)
        return super().load_processor(model_id)

    def load_model_and_processor(self, model_id: str, on_progress=None):
        register(override_native=True)
        with _architectures_through_auto_class():
            model, processor = super().load_model_and_processor(model_id, on_progress=on_progress)
        print(_loaded_line(model, model_id), file=sys.stderr, flush=True)
        return model, processor


class PluginServe(Serve):
    """transformers' ``Serve`` command on :class:`PluginModelLoader`, with the checkpoint and the address checked
    before anything starts (the listening socket is bound here and handed to transformers' ``run``). Its options,
    parsed by transformers' own signature, are unchanged."""

    def run(self, socket=None, engine_connection=None) -> None:
        self.loader = PluginModelLoader.from_loader(self.loader)
        if socket is not None:  # an API server that run_api_servers spawned: the supervisor checked and bound
            return super().run(socket, engine_connection)
        check_checkpoint(self.force_model)
        listener = listening_socket(self.host, self.port)  # before the model loads: a busy port fails at once
        host, port = listener.getsockname()[:2]  # --port 0: the port the system chose
        address = f"[{host}]" if ":" in host else host
        # uvicorn names the address only for sockets it binds itself
        print(
            f"deepseek-v3 serve: http://{address}:{port} answers once the model has loaded", file=sys.stderr, flush=True
        )
        try:
            super().run(listener, engine_connection)
        finally:
            listener.close()

    def run_api_servers(self, count: int) -> None:
        self.loader = PluginModelLoader.from_loader(self.loader)
        check_checkpoint(self.force_model)
        # transformers binds the shared socket itself, after this check: a port taken in between fails there
        listening_socket(self.host, self.port).close()
        super().run_api_servers(count)


HELP = (
    "transformers serve with the model classes of modeling_deepseekv3 (FP8 weights stay FP8), in every process it "
    "starts. DIR is a local checkpoint directory; the options are transformers serve's own, except that --host "
    f"defaults to {DEFAULT_HOST} (loopback only).\n\n" + (Serve.__doc__ or "").strip()
)
DIR_HELP = "A local DeepSeek-V3-family checkpoint directory: config.json, safetensors weights, tokenizer files."


def _command():
    """transformers' serve command, as its own option parser builds it from ``Serve``'s signature, on
    :class:`PluginServe`; only the help text of DIR and the default host differ."""
    app = typer.Typer(
        add_completion=False,
        rich_markup_mode=None,  # transformers' help text is plain: "[serving]" is no markup
        context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120},
    )
    app.command(name="serve", help=HELP)(PluginServe)
    command = typer.main.get_command(app)
    for param in command.params:
        if param.name == "host":
            param.default = DEFAULT_HOST
        elif param.name == "force_model":
            param.metavar, param.help = "DIR", DIR_HELP
    return command


def serve(directory: str, serve_args: list[str]) -> int:
    """Run ``transformers serve DIRECTORY *serve_args`` on this package's classes until it is stopped; 0 then.

    Errors a user can fix (bad option, not a checkpoint, port in use) raise ``ValueError`` with one clear line."""
    command = _command()
    try:
        result = command.main(args=[directory, *serve_args], prog_name="deepseek-v3 serve", standalone_mode=False)
    except typer.TyperException as exc:  # the option parser's usage errors (typer >= 0.2x vendors click)
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        raise ValueError(f"{message} (options: deepseek-v3 serve DIR --help)") from None
    return result if isinstance(result, int) else 0
