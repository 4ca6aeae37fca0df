"""A real `mlx_lm.server` node for tests: a tiny random-weight Qwen3 model built locally, and helpers to run it.

Nothing is downloaded: the tokenizer is a byte-level BPE trained here on generated text, the weights are drawn
from a fixed seed, and the server runs with the Hugging Face hub offline and a private HOME.

    model = build_tiny_model(Path("/tmp/mlxmux-tiny-qwen3"))   # ~0.3 s; later calls reuse the directory
    proc = start_mlx_server(model, port)
    wait_ready(port, 60, proc=proc)
    result = chat_stream(port, {"messages": [...], "max_tokens": 8, "temperature": 0})
    stop_server(proc)

The model: `model_type` "qwen3", 1 layer (`num_layers=2` for a real, quadratic prefill cost), hidden 64, 2 query
heads / 1 KV head of 32, MLP 128, float32, an untied `lm_head`, and a vocabulary of 1024 byte-level BPE tokens plus
the 7 added tokens below (1031). The chat template is Qwen3-Coder's: the system text, then the `# Tools` block in
the same system turn; assistant tool calls as `<tool_call>\n<function=NAME>` with `<parameter=...>` blocks; tool
results as `<tool_response>` in a user turn. From it mlx_lm infers its `qwen3_coder` tool parser. There are no
`<think>` tokens, so mlx_lm sees no reasoning model.

The model never emits an added token (so no EOS and no `<tool_call>`), a "<", or a byte outside printable ASCII,
newline and tab (see `_weights`): every answer is plain ASCII text that runs to `max_tokens`, finish_reason
"length", at any temperature. A request can still end on EOS at once with
`"logit_bias": {str(token_id(model, EOS_TOKEN)): 100}`.

`python -m tests.realnode [DIR]` builds the model and prints measurements (prefill times, prompt cache hits,
keepalives, /v1/models, LRU eviction).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Bump when anything that goes into the model directory changes: a cached directory with another version is rebuilt.
MODEL_VERSION = "tiny-qwen3-v1"
MARKER = ".mlxmux-tiny-model"

SEED = 1234
BPE_VOCAB_SIZE = 1024
HIDDEN_SIZE = 64
NUM_LAYERS = 2
NUM_HEADS = 2
NUM_KV_HEADS = 1
HEAD_DIM = 32
INTERMEDIATE_SIZE = 128
BIAS_CHANNEL = 8.0  # the constant hidden dimension 0 (see _weights)
SILENT_WEIGHT = 10.0

EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
# Control tokens (special: skipped by `decode(skip_special_tokens=True)`), then Qwen's non-special added tokens.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
ADDED_TOKENS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")

# Qwen3-Coder's chat template (system first, then tools, in one system turn). mlx_lm looks for
# "<tool_call>\n<function=" in it to pick the qwen3_coder tool parser.
CHAT_TEMPLATE = r"""{%- macro render_extra_keys(json_dict, handled_keys) -%}
    {%- if json_dict is mapping -%}
        {%- for json_key in json_dict if json_key not in handled_keys -%}
            {%- set value = json_dict[json_key] -%}
            {%- if value is mapping or (value is sequence and value is not string) -%}
                {{- '\n<' ~ json_key ~ '>' ~ (value | tojson | safe) ~ '</' ~ json_key ~ '>' -}}
            {%- else -%}
                {{- '\n<' ~ json_key ~ '>' ~ (value | string) ~ '</' ~ json_key ~ '>' -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- if messages[0]["role"] == "system" -%}
    {%- set system_message = messages[0]["content"] -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- if not tools is defined or tools is none -%}
    {%- set tools = [] -%}
{%- endif -%}
{%- if system_message is defined -%}
    {{- "<|im_start|>system\n" + system_message -}}
{%- elif tools | length > 0 -%}
    {{- "<|im_start|>system\nYou are Qwen, a helpful AI assistant that can interact with a computer to solve tasks." -}}
{%- endif -%}
{%- if tools | length > 0 -%}
    {{- "\n\n# Tools\n\nYou have access to the following functions:\n\n<tools>" -}}
    {%- for tool in tools -%}
        {%- if tool.function is defined -%}
            {%- set tool = tool.function -%}
        {%- endif -%}
        {{- "\n<function>\n<name>" ~ tool.name ~ "</name>" -}}
        {%- if tool.description is defined -%}
            {{- '\n<description>' ~ (tool.description | trim) ~ '</description>' -}}
        {%- endif -%}
        {{- '\n<parameters>' -}}
        {%- if tool.parameters is defined and tool.parameters is mapping
            and tool.parameters.properties is defined and tool.parameters.properties is mapping -%}
            {%- for param_name, param_fields in tool.parameters.properties | items -%}
                {{- '\n<parameter>\n<name>' ~ param_name ~ '</name>' -}}
                {%- if param_fields.type is defined -%}
                    {{- '\n<type>' ~ (param_fields.type | string) ~ '</type>' -}}
                {%- endif -%}
                {%- if param_fields.description is defined -%}
                    {{- '\n<description>' ~ (param_fields.description | trim) ~ '</description>' -}}
                {%- endif -%}
                {{- render_extra_keys(param_fields, ['name', 'type', 'description']) -}}
                {{- '\n</parameter>' -}}
            {%- endfor -%}
        {%- endif -%}
        {{- render_extra_keys(tool.parameters, ['type', 'properties']) -}}
        {{- '\n</parameters>' -}}
        {{- render_extra_keys(tool, ['type', 'name', 'description', 'parameters']) -}}
        {{- '\n</function>' -}}
    {%- endfor -%}
    {{- "\n</tools>" -}}
    {{- '\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:\n\n'
        ~ '<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n'
        ~ '</parameter>\n</function>\n</tool_call>' -}}
{%- endif -%}
{%- if system_message is defined or tools | length > 0 -%}
    {{- '<|im_end|>\n' -}}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if message.role == "assistant" and message.tool_calls is defined
        and message.tool_calls is iterable and message.tool_calls | length > 0 -%}
        {{- '<|im_start|>' + message.role -}}
        {%- if message.content is defined and message.content is string and message.content | trim | length > 0 -%}
            {{- '\n' + message.content | trim + '\n' -}}
        {%- endif -%}
        {%- for tool_call in message.tool_calls -%}
            {%- if tool_call.function is defined -%}
                {%- set tool_call = tool_call.function -%}
            {%- endif -%}
            {{- '\n<tool_call>\n<function=' + tool_call.name + '>\n' -}}
            {%- if tool_call.arguments is defined and tool_call.arguments is mapping -%}
                {%- for args_name, args_value in tool_call.arguments | items -%}
                    {{- '<parameter=' + args_name + '>\n' -}}
                    {%- if args_value is mapping or (args_value is sequence and args_value is not string) -%}
                        {{- args_value | tojson | safe -}}
                    {%- else -%}
                        {{- args_value | string -}}
                    {%- endif -%}
                    {{- '\n</parameter>\n' -}}
                {%- endfor -%}
            {%- endif -%}
            {{- '</function>\n</tool_call>' -}}
        {%- endfor -%}
        {{- '<|im_end|>\n' -}}
    {%- elif message.role == "tool" -%}
        {%- if loop.first or loop.previtem.role != "tool" -%}
            {{- '<|im_start|>user\n' -}}
        {%- endif -%}
        {{- '<tool_response>\n' + message.content + '\n</tool_response>\n' -}}
        {%- if loop.last or loop.nextitem.role != "tool" -%}
            {{- '<|im_end|>\n' -}}
        {%- endif -%}
    {%- else -%}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
{%- endif -%}
"""

_WORD_TEXT = (
    "the of and to in is that for it as with was on be by this are or from at an not have which you all can "
    "but one has were will they more their if when there so about what we some would into other than only its "
    "been time also new first may any use these like file code test node cache prompt token request response "
    "server model value error return function class method string number list object type name path line data "
    "read write open close start stop run build check update create delete change set get send receive stream "
    "user system assistant tool message content text input output result status header body json key version "
    "process thread queue batch limit timeout retry health route session gateway upstream local remote port "
    "address config option default flag argument parameter variable module package import export source target "
    "directory folder command shell script project commit branch merge review issue bug fix feature release "
    "because before after while during between without within through under over again still even just most "
    "each every both few many much same such own very well back down here then now how why where who whom "
    "make made take took give gave find found keep kept know knew think thought show shown call called work"
)
_WORDS = _WORD_TEXT.split()
_IDENT_TEXT = (
    "self cls None True False def async await yield lambda raise except finally assert elif else import from "
    "print len range dict list tuple str int float bytes bool isinstance getattr setattr kwargs args"
)
_IDENTS = _IDENT_TEXT.split()


def sample_text(n_bytes: int, seed: int = 0) -> str:
    """Deterministic English-like prose mixed with Python, JSON and shell lines, about `n_bytes` long.

    The tokenizer is trained on this generator (seed 0, 400 KB), so other seeds tokenize alike: 12,000
    characters are ~3,700-3,900 tokens (about 3.2 characters a token; real English such as README.md gets ~1.7).
    """
    rng = random.Random(seed)
    # Zipf-like: early words are far more common.
    weights = [1.0 / (i + 1) ** 0.9 for i in range(len(_WORDS))]
    out: list[str] = []
    size = 0
    while size < n_bytes:
        kind = rng.random()
        if kind < 0.6:
            words = rng.choices(_WORDS, weights, k=rng.randint(6, 18))
            words[0] = words[0].capitalize()
            if rng.random() < 0.2:
                words.insert(rng.randrange(len(words)), str(rng.randint(0, 9999)))
            line = " ".join(words) + rng.choice([".", ".", ".", "?", "!", ":", ","])
        elif kind < 0.8:
            a, b, c = rng.choices(_WORDS, weights, k=3)
            ident = rng.choice(_IDENTS)
            line = rng.choice(
                [
                    f"def {a}_{b}({ident}, {c}: str) -> int:",
                    f"    return {a}.{b}({c}_{rng.randint(0, 99)})",
                    f"    if {ident} is not None and {a}_{b} > {rng.randint(0, 999)}:",
                    f"        {a} = {b}[{c!r}]",
                    f"class {a.capitalize()}{b.capitalize()}({c.capitalize()}):",
                    f"    {ident}.{a}_{b} = {c}",
                ]
            )
        elif kind < 0.9:
            a, b, c = rng.choices(_WORDS, weights, k=3)
            line = json.dumps({a: b, c: rng.randint(0, 10**6), "ok": rng.random() < 0.5})
        else:
            a, b, c = rng.choices(_WORDS, weights, k=3)
            line = rng.choice(
                [
                    f"$ git {a} --{b} src/{c}.py",
                    f"/usr/lib/{a}/{b}_{c}.so: {rng.randint(0, 9)} warnings",
                    f'  File "/work/{a}/{b}.py", line {rng.randint(1, 999)}, in {c}',
                ]
            )
        out.append(line)
        size += len(line) + 1
    return "\n".join(out)[:n_bytes]


def _train_tokenizer(out_dir: Path) -> Any:
    """Write tokenizer.json (byte-level BPE, then the added tokens) and return the `tokenizers.Tokenizer`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(sample_text(400_000, seed=0).splitlines(), trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TOKENS])
    tok.save(str(out_dir / "tokenizer.json"))
    return tok


def _silent_ids(tok: Any) -> list[int]:
    """Token ids the model must never emit: the added tokens, and any token whose text has a byte other than
    printable ASCII, newline or tab, or has a "<" (so no generated text can spell "<tool_call>")."""
    from tokenizers import decoders

    decoder = decoders.ByteLevel()
    silent = []
    for token, i in sorted(tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1]):
        if token in SPECIAL_TOKENS or token in ADDED_TOKENS:
            silent.append(i)
            continue
        text = decoder.decode([token])
        if "<" in text or not all(c in "\n\t" or " " <= c <= "~" for c in text):
            silent.append(i)
    return silent


def _config(vocab_size: int, num_layers: int, eos_id: int, pad_id: int) -> dict[str, Any]:
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_size": HIDDEN_SIZE,
        "num_hidden_layers": num_layers,
        "intermediate_size": INTERMEDIATE_SIZE,
        "num_attention_heads": NUM_HEADS,
        "num_key_value_heads": NUM_KV_HEADS,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "vocab_size": vocab_size,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "bos_token_id": pad_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
    }


def _weights(vocab_size: int, num_layers: int, silent: Sequence[int]) -> dict[str, Any]:
    """Random float32 weights in mlx_lm's Qwen3 names, from numpy's PCG64 with a fixed seed.

    Hidden dimension 0 is a constant channel: every embedding has BIAS_CHANNEL there, no layer reads it (the
    input columns of q/k/v/gate/up are 0) or writes it (the output rows of o_proj/down_proj are 0), so after the
    final RMSNorm it is always positive. `lm_head` reads it only for the silent tokens, with weight -SILENT_WEIGHT:
    their logits sit far below every other token's at any temperature.
    """
    import numpy as np

    rng = np.random.default_rng(SEED)

    def linear(out_dim: int, in_dim: int) -> Any:
        return (rng.standard_normal((out_dim, in_dim)) / np.sqrt(in_dim)).astype(np.float32)

    def reads(out_dim: int) -> Any:  # a layer's input projection: blind to the constant channel
        m = linear(out_dim, HIDDEN_SIZE)
        m[:, 0] = 0.0
        return m

    def writes(in_dim: int) -> Any:  # a layer's output projection: leaves the constant channel alone
        m = linear(HIDDEN_SIZE, in_dim)
        m[0, :] = 0.0
        return m

    def ones(n: int) -> Any:
        return np.ones((n,), dtype=np.float32)

    embed = rng.standard_normal((vocab_size, HIDDEN_SIZE)).astype(np.float32)
    embed[:, 0] = BIAS_CHANNEL
    w: dict[str, Any] = {"model.embed_tokens.weight": embed}
    for i in range(num_layers):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = reads(NUM_HEADS * HEAD_DIM)
        w[p + "self_attn.k_proj.weight"] = reads(NUM_KV_HEADS * HEAD_DIM)
        w[p + "self_attn.v_proj.weight"] = reads(NUM_KV_HEADS * HEAD_DIM)
        w[p + "self_attn.o_proj.weight"] = writes(NUM_HEADS * HEAD_DIM)
        w[p + "self_attn.q_norm.weight"] = ones(HEAD_DIM)
        w[p + "self_attn.k_norm.weight"] = ones(HEAD_DIM)
        w[p + "mlp.gate_proj.weight"] = reads(INTERMEDIATE_SIZE)
        w[p + "mlp.up_proj.weight"] = reads(INTERMEDIATE_SIZE)
        w[p + "mlp.down_proj.weight"] = writes(INTERMEDIATE_SIZE)
        w[p + "input_layernorm.weight"] = ones(HIDDEN_SIZE)
        w[p + "post_attention_layernorm.weight"] = ones(HIDDEN_SIZE)
    w["model.norm.weight"] = ones(HIDDEN_SIZE)
    head = linear(vocab_size, HIDDEN_SIZE)
    head[:, 0] = 0.0
    head[list(silent)] = 0.0
    head[list(silent), 0] = -SILENT_WEIGHT
    w["lm_head.weight"] = head
    return w


def _write_model(out_dir: Path, num_layers: int) -> None:
    import mlx.core as mx

    tok = _train_tokenizer(out_dir)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    eos_id, pad_id = tok.token_to_id(EOS_TOKEN), tok.token_to_id(PAD_TOKEN)
    config = _config(vocab_size, num_layers, eos_id, pad_id)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": pad_id, "eos_token_id": [eos_id, pad_id], "pad_token_id": pad_id}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 32768,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "bos_token": None,
        "unk_token": None,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "errors": "replace",
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    weights = {k: mx.array(v) for k, v in _weights(vocab_size, num_layers, _silent_ids(tok)).items()}
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})


def _is_built(root: Path, stamp: str) -> bool:
    marker = root / MARKER
    return marker.is_file() and marker.read_text().strip() == stamp


def build_tiny_model(dir: Path, *, num_layers: int = 1) -> Path:
    """Build the tiny model into `dir`, or reuse a finished build of the same version there; return `dir`.

    `num_layers` 1 (the default) makes prefill almost free: mlx_lm evaluates only the KV caches while it
    prefills, and the last layer's attention feeds nothing but the logits, so a one-layer model computes
    attention for the final prompt token only (~0.03 s for 3.8k tokens). With 2, layer 0's attention runs over the
    whole prompt and prefill grows with its square (~1.3-1.5 s for 3.8k tokens, ~3-3.7 s for 6.3k here): use it
    to see real prefill time and several keepalives. Give each `num_layers` its own directory.

    Deterministic: the same bytes on every build. Safe when several processes build one directory at once: each
    writes a private sibling directory and renames it into place.
    """
    root = Path(dir)
    stamp = f"{MODEL_VERSION} layers={num_layers}"
    if _is_built(root, stamp):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-build-", dir=root.parent))
    try:
        tmp.chmod(0o755)
        _write_model(tmp, num_layers)
        (tmp / MARKER).write_text(stamp + "\n")
        if _is_built(root, stamp):
            return root  # another process finished first
        if root.exists():
            shutil.rmtree(root)
        try:
            tmp.rename(root)
        except OSError:
            if not _is_built(root, stamp):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def token_id(model_dir: Path, token: str) -> int:
    """The id of an added token (e.g. EOS_TOKEN) in a built model, for `logit_bias`."""
    tok = json.loads((Path(model_dir) / "tokenizer.json").read_text())
    for added in tok["added_tokens"]:
        if added["content"] == token:
            return int(added["id"])
    raise KeyError(token)


def count_tokens(model_dir: Path, text: str) -> int:
    """Tokens of `text` alone (the chat template adds a few: 4 for a lone user message)."""
    from tokenizers import Tokenizer

    return len(Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json")).encode(text).ids)


# --- the server ---------------------------------------------------------------------------------------------------


def server_home(model_dir: Path, *, hf_cache: bool) -> Path:
    """The HOME a server of `model_dir` runs with (HF_HOME is HOME/hf): `home-hf` or `home-nohf` inside it.

    With `hf_cache` the folder HF_HOME/hub exists (empty), so GET /v1/models lists the model's path; without it
    mlx_lm 0.32.2's `scan_cache_dir()` raises after the 200 headers went out and the body is empty.
    """
    home = Path(model_dir).resolve() / ("home-hf" if hf_cache else "home-nohf")
    hub = home / "hf" / "hub"
    if hf_cache:
        hub.mkdir(parents=True, exist_ok=True)
    else:
        home.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(hub, ignore_errors=True)
    return home


def server_env(home: Path) -> dict[str, str]:
    """This process's environment without HF_*/HUGGINGFACE_*/TRANSFORMERS_* settings, offline, with HOME=`home`."""
    prefixes = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes) and k != "XDG_CACHE_HOME"}
    env.update(
        HOME=str(home),
        HF_HOME=str(home / "hf"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    return env


_LOGS: dict[int, Path] = {}


def start_mlx_server(
    model_dir: Path,
    port: int,
    *,
    prompt_cache_size: int = 10,
    extra_args: Sequence[str] = (),
    hf_cache: bool = False,
    log_path: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start `python -m mlx_lm.server` for `model_dir` on 127.0.0.1:`port`; returns at once (then `wait_ready`).

    `--model` is the resolved absolute path, which is the id GET /v1/models lists: a request whose `model` is that
    id, or that has no `model`, shares the default model's prompt cache (any other name makes mlx_lm load that
    name as a new model). stdout and stderr go to `log_path` (a temporary file when None; `server_log` reads it,
    `stop_server` deletes it). `extra_args` go last, e.g. ("--prefill-step-size", "512").
    """
    model = Path(model_dir).resolve()
    home = server_home(model, hf_cache=hf_cache)
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix=f"mlx-server-{port}-", suffix=".log")
        os.close(fd)
        log_path = Path(name)
    args = [sys.executable, "-m", "mlx_lm.server", "--model", str(model), "--host", "127.0.0.1", "--port", str(port)]
    args += ["--prompt-cache-size", str(prompt_cache_size), *extra_args]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=server_env(home), cwd=home
        )
    _LOGS[proc.pid] = log_path
    return proc


def server_log(proc: subprocess.Popen[bytes]) -> str:
    """What a server started by `start_mlx_server` has printed so far."""
    path = _LOGS.get(proc.pid)
    return path.read_text(errors="replace") if path is not None and path.exists() else ""


def wait_ready(port: int, timeout: float = 60.0, *, proc: subprocess.Popen[bytes] | None = None) -> float:
    """Poll GET /health until it answers 200 {"status": "ok"}; return the seconds waited.

    /health answers once the HTTP server listens, while the generation thread may still be loading the model:
    a request sent before the load ends waits for it. With `proc`, fail at once (with its log) if it exits.
    """
    start = time.monotonic()
    last: object = None
    while time.monotonic() - start < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"mlx_lm.server exited with {proc.returncode}:\n{server_log(proc)}")
        try:
            status, _, body = http_request(port, "GET", "/health", timeout=1.0)
            if status == 200 and json.loads(body or b"{}").get("status") == "ok":
                return time.monotonic() - start
            last = (status, body[:200])
        except (OSError, ValueError) as exc:
            last = exc
        time.sleep(0.05)
    log = server_log(proc) if proc is not None else ""
    raise TimeoutError(f"mlx_lm.server on port {port} not ready after {timeout}s (last: {last!r})\n{log}")


def stop_server(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int | None:
    """SIGTERM, then SIGKILL after `timeout`; delete the log file; return the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    path = _LOGS.pop(proc.pid, None)
    if path is not None:
        with contextlib.suppress(OSError):
            path.unlink()
    return proc.returncode


@contextlib.contextmanager
def mlx_server(
    model_dir: Path,
    *,
    port: int | None = None,
    prompt_cache_size: int = 10,
    extra_args: Sequence[str] = (),
    hf_cache: bool = False,
    timeout: float = 60.0,
) -> Iterator[int]:
    """Start a server on `port` (a free one when None), wait until ready, yield the port, stop it."""
    port = port or free_port()
    proc = start_mlx_server(
        model_dir, port, prompt_cache_size=prompt_cache_size, extra_args=extra_args, hf_cache=hf_cache
    )
    try:
        wait_ready(port, timeout, proc=proc)
        yield port
    finally:
        stop_server(proc)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- a raw HTTP client: it sees the status line, SSE comments, and when the server closes --------------------------


def _request_bytes(port: int, method: str, path: str, body: bytes) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
    return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


def _parse_head(head: bytes) -> tuple[int, str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return int(lines[0].split()[1]), lines[0], headers


def http_request(
    port: int, method: str, path: str, body: bytes = b"", *, timeout: float = 30.0
) -> tuple[int, dict[str, str], bytes]:
    """One request on a new connection, read until the server closes it: (status, headers, body).

    mlx_lm.server answers HTTP/1.0 and closes every connection, so EOF ends the body. The status line is in
    headers[":status-line"].
    """
    chunks: list[bytes] = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(_request_bytes(port, method, path, body))
        while data := s.recv(65536):
            chunks.append(data)
    head, _, payload = b"".join(chunks).partition(b"\r\n\r\n")
    status, status_line, headers = _parse_head(head)
    headers[":status-line"] = status_line
    return status, headers, payload


@dataclass
class StreamEvent:
    at: float  # seconds after the request was sent, when its last byte arrived
    kind: str  # "comment" (": keepalive 2048/3739"), "data" (a JSON chunk), "done" (data: [DONE]) or "other"
    text: str
    data: dict[str, Any] | None = None


@dataclass
class StreamResult:
    status: int
    status_line: str
    headers: dict[str, str]
    events: list[StreamEvent] = field(default_factory=list)
    first_byte_s: float = -1.0
    closed_s: float = -1.0  # when the server closed the connection
    trailing: bytes = b""  # whatever came after data: [DONE] (or after the last complete event)

    @property
    def comments(self) -> list[str]:
        return [e.text for e in self.events if e.kind == "comment"]

    @property
    def chunks(self) -> list[dict[str, Any]]:
        return [e.data for e in self.events if e.kind == "data" and e.data is not None]

    @property
    def done(self) -> bool:
        return any(e.kind == "done" for e in self.events)

    @property
    def done_s(self) -> float:
        return next((e.at for e in self.events if e.kind == "done"), -1.0)

    @property
    def first_data_s(self) -> float:
        return next((e.at for e in self.events if e.kind == "data"), -1.0)

    def _deltas(self) -> list[dict[str, Any]]:
        return [c["choices"][0].get("delta") or {} for c in self.chunks if c.get("choices")]

    @property
    def text(self) -> str:
        return "".join(d.get("content") or "" for d in self._deltas())

    @property
    def reasoning(self) -> str:
        return "".join(d.get("reasoning") or "" for d in self._deltas())

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        return [tc for d in self._deltas() for tc in d.get("tool_calls") or []]

    @property
    def finish_reason(self) -> str | None:
        reasons = [c["choices"][0].get("finish_reason") for c in self.chunks if c.get("choices")]
        return next((r for r in reversed(reasons) if r), None)

    @property
    def usage(self) -> dict[str, Any]:
        return next((c["usage"] for c in reversed(self.chunks) if c.get("usage")), {})

    @property
    def prompt_tokens(self) -> int:
        return int(self.usage.get("prompt_tokens") or 0)

    @property
    def cached_tokens(self) -> int:
        return int((self.usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)


def chat_stream(port: int, body: Mapping[str, Any], *, timeout: float = 120.0) -> StreamResult:
    """POST /v1/chat/completions with `body` plus stream true and usage on; read the SSE stream until EOF."""
    payload = json.dumps({**body, "stream": True, "stream_options": {"include_usage": True}}).encode()
    start = time.monotonic()
    result: StreamResult | None = None
    buf = b""
    first = -1.0
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(_request_bytes(port, "POST", "/v1/chat/completions", payload))
        while got := s.recv(65536):
            now = time.monotonic() - start
            first = now if first < 0 else first
            buf += got
            if result is None:
                if b"\r\n\r\n" not in buf:
                    continue
                head, _, buf = buf.partition(b"\r\n\r\n")
                result = StreamResult(*_parse_head(head))
            while b"\n\n" in buf and not result.done:
                block, _, buf = buf.partition(b"\n\n")
                result.events.append(_sse_event(block.decode(errors="replace"), now))
    if result is None:  # closed before the end of the headers
        result = StreamResult(0, buf.decode("latin-1"), {})
        buf = b""
    result.first_byte_s, result.closed_s, result.trailing = first, time.monotonic() - start, buf
    return result


def _sse_event(block: str, at: float) -> StreamEvent:
    if block.startswith(":"):
        return StreamEvent(at, "comment", block[1:].strip())
    text = block.removeprefix("data:").strip()
    if text == "[DONE]":
        return StreamEvent(at, "done", text)
    try:
        return StreamEvent(at, "data", text, json.loads(text))
    except ValueError:
        return StreamEvent(at, "other", block)


# --- measurements: python -m tests.realnode [DIR] -------------------------------------------------------------------

READ_FILE_TOOL = {
    "type": "function",
    "function": {
        "name": "read_file",
        "description": "Read a file from the workspace.",
        "parameters": {
            "type": "object",
            "properties": {"path": {"type": "string", "description": "The file to read"}},
            "required": ["path"],
        },
    },
}

TOOL_HISTORY: list[dict[str, Any]] = [
    {"role": "system", "content": "Use the tools."},
    {"role": "user", "content": "Read README.md"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "toolu_1",
                "type": "function",
                "function": {"name": "read_file", "arguments": json.dumps({"path": "README.md"})},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "toolu_1", "content": "# mlxmux\nA gateway."},
    {"role": "user", "content": "Now read setup.py"},
]


def _summary(r: StreamResult) -> dict[str, Any]:
    return {
        "status_line": r.status_line,
        "content_type": r.headers.get("content-type"),
        "first_data_s": round(r.first_data_s, 3),
        "done_s": round(r.done_s, 3),
        "closed_s": round(r.closed_s, 3),
        "closed_right_after_done": r.done and not r.trailing and r.closed_s - r.done_s < 0.05,
        "prompt_tokens": r.prompt_tokens,
        "cached_tokens": r.cached_tokens,
        "keepalives": r.comments,
        "finish_reason": r.finish_reason,
        "text": r.text,
        "reasoning": r.reasoning,
        "tool_calls": r.tool_calls,
    }


def _chat(port: int, messages: list[dict[str, Any]], **kw: Any) -> StreamResult:
    return chat_stream(port, {"messages": messages, "max_tokens": 8, "temperature": 0, **kw})


def _user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def measure_prefill(model_dir: Path, sizes: Sequence[int] = (12_000, 20_000)) -> dict[str, Any]:
    """Cold prefill of prompts of `sizes` characters (sample_text) on a fresh server of `model_dir`."""
    out: dict[str, Any] = {}
    with mlx_server(model_dir) as port:
        _chat(port, _user("hi"), max_tokens=1)  # the model load
        for i, n in enumerate(sizes):
            r = _chat(port, _user(sample_text(n, seed=50 + i)))
            out[f"{n}_chars"] = {
                "prompt_tokens": r.prompt_tokens,
                "cached_tokens": r.cached_tokens,
                "first_data_s": round(r.first_data_s, 3),
                "keepalives_at_s": [(e.text, round(e.at, 3)) for e in r.events if e.kind == "comment"],
            }
    return out


def measure(model_dir: Path, *, rebuild: bool = False) -> dict[str, Any]:
    """Build (or reuse) the model in `model_dir`, run servers on it, and return what happened."""
    import mlx.core as mx

    report: dict[str, Any] = {}
    model_dir = Path(model_dir)
    if rebuild:
        shutil.rmtree(model_dir, ignore_errors=True)
    t = time.monotonic()
    build_tiny_model(model_dir)
    report["build_s"] = round(time.monotonic() - t, 3)
    t = time.monotonic()
    build_tiny_model(model_dir)
    report["reuse_s"] = round(time.monotonic() - t, 5)
    weights: dict[str, mx.array] = mx.load(str(model_dir / "model.safetensors"))  # type: ignore[assignment]
    report["model"] = {
        "config": {k: v for k, v in json.loads((model_dir / "config.json").read_text()).items() if "token" not in k},
        "parameters": sum(int(v.size) for v in weights.values()),
        "safetensors_bytes": (model_dir / "model.safetensors").stat().st_size,
        "eos_id": token_id(model_dir, EOS_TOKEN),
    }
    long_text = sample_text(12_000, seed=7)
    report["tokens_of_12000_chars"] = {"sample_text": count_tokens(model_dir, long_text)}
    readme = Path(__file__).resolve().parent.parent / "README.md"
    if readme.exists():
        text = readme.read_text()[:12_000]
        report["tokens_of_12000_chars"][f"README.md ({len(text)} chars)"] = count_tokens(model_dir, text)

    # Server A: hub folder present, default flags.
    port = free_port()
    t = time.monotonic()
    proc = start_mlx_server(model_dir, port, hf_cache=True)
    try:
        report["health_ready_s"] = round(wait_ready(port, 60, proc=proc), 3)
        first = _chat(port, _user("hi"), max_tokens=1)
        report["first_answer_s"] = round(time.monotonic() - t, 3)
        report["first_answer"] = _summary(first)
        _, headers, body = http_request(port, "GET", "/v1/models")
        report["v1_models_with_hub"] = [headers[":status-line"], body.decode(errors="replace")]
        report["v1_models_headers"] = headers

        tools = [READ_FILE_TOOL]
        msgs = [{"role": "system", "content": "You are a coding agent."}, *_user(long_text)]
        cold = _chat(port, msgs, tools=tools)
        report["cold_12000_chars"] = _summary(cold)
        report["stream_headers"] = cold.headers
        msgs2 = [*msgs, {"role": "assistant", "content": cold.text}, *_user("And now?")]
        report["followup"] = _summary(_chat(port, msgs2, tools=tools))
        report["same_again"] = _summary(_chat(port, msgs, tools=tools))
        msgs3 = [*msgs2, {"role": "assistant", "content": "ok"}, *_user("Next.")]
        report["followup_with_model_id"] = _summary(_chat(port, msgs3, tools=tools, model=str(model_dir.resolve())))
        report["tool_history"] = _summary(_chat(port, TOOL_HISTORY, tools=tools, max_tokens=16))
        calls, reasons, chars = 0, dict[str, int](), set[str]()
        for i in range(12):
            prompt = [{"role": "system", "content": "Call read_file."}, *_user(sample_text(300, seed=100 + i))]
            r = _chat(port, prompt, tools=tools, max_tokens=32, temperature=1.0)
            calls += len(r.tool_calls)
            reasons[str(r.finish_reason)] = reasons.get(str(r.finish_reason), 0) + 1
            chars |= set(r.text)
        report["12_sampled_answers_temperature_1"] = {
            "tool_calls": calls,
            "finish_reasons": reasons,
            "non_printable_ascii_chars": sorted(c for c in chars if not (c in "\n\t" or " " <= c <= "~")),
        }
        eos = _chat(port, _user("stop"), logit_bias={str(token_id(model_dir, EOS_TOKEN)): 100.0})
        report["eos_via_logit_bias"] = _summary(eos)
        report["server_alive_after_all"] = proc.poll() is None
    finally:
        stop_server(proc)

    # Server B: no hub folder, a 512-token prefill step, an LRU of 2 prompt caches.
    port = free_port()
    proc = start_mlx_server(model_dir, port, prompt_cache_size=2, extra_args=("--prefill-step-size", "512"))
    try:
        wait_ready(port, 60, proc=proc)
        _, headers, body = http_request(port, "GET", "/v1/models")
        report["v1_models_without_hub"] = [headers[":status-line"], body.decode(errors="replace")]
        report["prefill_step_512"] = _summary(_chat(port, _user(long_text)))
        prompts = [f"{word} " + sample_text(4_000, seed=200 + i) for i, word in enumerate(["Alpha", "Bravo", "Zulu"])]
        lru = [_chat(port, _user(p)) for p in prompts]
        revisit = _chat(port, _user(prompts[0]))
        report["lru_2_prompt_caches"] = {
            "three_distinct_(prompt,cached)": [(r.prompt_tokens, r.cached_tokens) for r in lru],
            "first_again": (revisit.prompt_tokens, revisit.cached_tokens),
            "first_once_more": (lambda r: (r.prompt_tokens, r.cached_tokens))(_chat(port, _user(prompts[0]))),
        }
    finally:
        stop_server(proc)

    two = model_dir.parent / f"{model_dir.name}-2layers"
    build_tiny_model(two, num_layers=2)
    report["prefill_1_layer"] = measure_prefill(model_dir)
    report["prefill_2_layers"] = measure_prefill(two)
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the tiny model, run mlx_lm.server on it, print measurements")
    parser.add_argument("dir", nargs="?", default=str(Path(tempfile.gettempdir()) / "mlxmux-tiny-qwen3"))
    parser.add_argument("--rebuild", action="store_true", help="delete the directory first, to time a cold build")
    args = parser.parse_args(argv)
    print(json.dumps(measure(Path(args.dir), rebuild=args.rebuild), indent=2))


if __name__ == "__main__":
    main()
