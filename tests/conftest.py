"""Shared test fixtures. Each group below belongs to one area; keep groups separate."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# =============================================================================================
# Prefect: an ephemeral server with its own home per test session, no analytics, quiet logs
# (the temporary server logs at shutdown, after pytest has closed the captured streams).
# Set before anything imports prefect.
# =============================================================================================
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="dareflow-prefect-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# A loaded 2-core machine can take over a minute to start the ephemeral server.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "150")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

# =============================================================================================
# Checkpoint IO fixtures (src/dareflow/io/storage.py, checkpoints.py, plan.py, assemble.py)
#
# Tiny real Hugging Face models (built with transformers configs and save_pretrained, once
# per session) and a moto S3 server. transformers is imported lazily: it is slow to import.
# =============================================================================================

TINY_VOCAB = 64


def _tiny_tokenizer():
    """A 64-token word-level tokenizer ("w3 w4 ..."), saved with the tiny Llama."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, TINY_VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def _build_tiny_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=TINY_VOCAB, max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama (hidden 32, 2 layers, vocab 64, untied head) with a tokenizer:
    config.json, generation_config.json, model.safetensors, tokenizer files."""
    out = tmp_path_factory.mktemp("tiny-llama")
    _build_tiny_llama().save_pretrained(out)
    _tiny_tokenizer().save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_sharded_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny Llama saved in several shards with model.safetensors.index.json."""
    out = tmp_path_factory.mktemp("tiny-llama-sharded")
    _build_tiny_llama().save_pretrained(out, max_shard_size="20KB")
    return out


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 (n_embd 32, 2 layers): tied embeddings, so no lm_head.weight stored."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    out = tmp_path_factory.mktemp("tiny-gpt2")
    config = GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=TINY_VOCAB, n_positions=32,
        bos_token_id=1, eos_token_id=2,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config)
    # Written by hand, as the Hub's gpt2 checkpoint is: whether save_pretrained drops the
    # tied head depends on transformers' loading state left by earlier tests in the process.
    from safetensors.torch import save_file
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()
               if k != "lm_head.weight"}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT masked LM (hidden 32, 2 layers): embeddings, encoder.layer.N, cls head."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    out = tmp_path_factory.mktemp("tiny-bert")
    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        vocab_size=TINY_VOCAB, max_position_embeddings=32,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        BertForMaskedLM(config).save_pretrained(out)
    return out


@pytest.fixture
def s3_store(s3_server, monkeypatch: pytest.MonkeyPatch):
    """Bucket ``dareflow-test`` on the session moto server (``s3_server``, defined in the
    storage/download group below); created when missing, shared by the tests that use it
    (each test writes under its own prefix).

    Yields:
        ``(bucket_uri, storage_options)``: ``"s3://dareflow-test"`` and the s3fs options
        to pass to every ``dareflow.io.storage`` call (no AWS_* credentials variables needed).
    """
    from dareflow.io import storage
    from tests.servers import REGION

    # s3fs/botocore need a region; region_name must stay out of client_kwargs (ASSETS.md).
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    # One cached s3fs instance, as in production: a fresh client per call costs ~0.1 s.
    options = s3_server.storage_options(skip_instance_cache=False)
    fs, _ = storage.get_fs("s3://dareflow-test", **options)
    if not fs.exists("dareflow-test"):
        fs.mkdir("dareflow-test")
    return "s3://dareflow-test", options


# ============================================================================ end checkpoint IO


# =============================================================================================
# Object storage and download fixtures (src/dareflow/io/s3.py, src/dareflow/sources/, tests/servers.py)
#
# Real servers on 127.0.0.1 (see tests/servers.py): a session-wide moto_server subprocess, a
# fresh bucket per test with the AWS_* variables pointing at it, a disk-backed nanio server
# that checks SigV4 credentials, and a factory for fake Hugging Face Hubs.
# =============================================================================================


class S3Bucket(tuple):
    """``(uri, storage_options, server)`` with attribute access; unpacks like a tuple."""

    __slots__ = ()

    def __new__(cls, uri: str, storage_options: dict, server):
        return super().__new__(cls, (uri, storage_options, server))

    uri = property(lambda self: self[0])
    storage_options = property(lambda self: self[1])
    server = property(lambda self: self[2])


_AWS_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
             "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION",
             "AWS_PROFILE")


def _point_aws_env_at(monkeypatch: pytest.MonkeyPatch, server) -> None:
    for var in _AWS_VARS:
        monkeypatch.delenv(var, raising=False)
    for var, value in server.credentials.items():
        monkeypatch.setenv(var, value)


def _fresh_bucket(monkeypatch: pytest.MonkeyPatch, server):
    import contextlib
    import uuid

    from dareflow.io import storage

    _point_aws_env_at(monkeypatch, server)
    options = server.storage_options()
    name = f"test-{uuid.uuid4().hex[:12]}"
    fs, _ = storage.get_fs(f"s3://{name}", **options)
    fs.mkdir(name)
    yield S3Bucket(f"s3://{name}", options, server)
    if server.running:  # a test may have stopped or restarted it
        with contextlib.suppress(Exception):
            # Not rm(recursive=True): nanio 0.1.7 answers 500 when DeleteObjects includes the
            # folder keys s3fs adds, and botocore retries for ~10 s.
            fs.rm(fs.find(name))
            fs.rmdir(name)


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server (``moto_server`` subprocess) for the whole session; stopped at the end
    (its whole process group). Objects live in RAM; any credentials are accepted."""
    from tests.servers import moto_s3_server, process_group_alive

    server = moto_s3_server().start()
    try:
        yield server
    finally:
        pid = server.pid
        server.stop()
        assert pid is None or not process_group_alive(pid), "moto_server outlived its fixture"


@pytest.fixture
def s3_bucket(s3_server, monkeypatch: pytest.MonkeyPatch):
    """A fresh, empty bucket on the session moto server, deleted after the test.

    The AWS_* variables point at the server for the test (so ``storage_options_for`` and
    botocore find it); returns ``S3Bucket(uri="s3://test-…", storage_options={...}, server)``.
    """
    yield from _fresh_bucket(monkeypatch, s3_server)


@pytest.fixture(scope="session")
def nanio_server(tmp_path_factory: pytest.TempPathFactory):
    """A nanio S3 server for the session: disk-backed (state survives ``restart()``) and
    checking SigV4 credentials (a wrong secret gets 403)."""
    from tests.servers import nanio_s3_server, process_group_alive

    server = nanio_s3_server(tmp_path_factory.mktemp("nanio-data")).start()
    try:
        yield server
    finally:
        pid = server.pid
        server.stop()
        assert pid is None or not process_group_alive(pid), "nanio outlived its fixture"


@pytest.fixture
def nanio_bucket(nanio_server, monkeypatch: pytest.MonkeyPatch):
    """Like ``s3_bucket``, on the credential-checking nanio server."""
    yield from _fresh_bucket(monkeypatch, nanio_server)


@pytest.fixture
def hf_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Isolates huggingface_hub from the machine: no HF_TOKEN, HF_ENDPOINT or HF_HUB_OFFLINE
    inherited, HF_HOME in a temp dir (only honoured where huggingface_hub reads it at call time;
    its constants are read at import). Returns HF_HOME."""
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE",
                "HF_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return home


@pytest.fixture
def fake_hub(hf_env):
    """Factory: ``fake_hub({"org/name": folder}, token=None) -> FakeHub`` (started; stopped
    after the test). Pass ``endpoint=hub.endpoint`` to the code under test."""
    from tests.servers import fake_hf_hub

    hubs = []

    def start(repos, token=None):
        hub = fake_hf_hub(repos, token=token).start()
        hubs.append(hub)
        return hub

    yield start
    for hub in hubs:
        hub.stop()


# ======================================================================= end storage/download
