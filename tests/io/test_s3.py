"""S3 settings and real loopback S3 servers (moto, nanio): round trips, ranged reads,
credentials, lifecycle. No mocks: every request goes over HTTP to a real server process."""

from __future__ import annotations

import os
import sys

import pytest
from pydantic import SecretStr

from dareflow.io import storage
from dareflow.io.s3 import (
    REDACTED,
    S3Settings,
    explain_s3_error,
    is_s3_uri,
    redact,
    storage_options_for,
    verify_s3_access,
)
from tests.servers import (
    S3Server,
    ServerStartError,
    moto_s3_server,
    nanio_s3_server,
    process_group_alive,
)

SECRET = "s3cr3t-value-never-shown"


# ------------------------------------------------------------------------------------------
# settings (no server)
# ------------------------------------------------------------------------------------------


def test_settings_from_env_and_section_precedence():
    env = {
        "AWS_ACCESS_KEY_ID": "AKIAENV00001234",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_SESSION_TOKEN": "sess-token-xyz",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
        "AWS_DEFAULT_REGION": "eu-west-1",
    }
    s = S3Settings.from_env(env)
    assert s.access_key_id == "AKIAENV00001234"
    assert s.secret_access_key.get_secret_value() == SECRET
    assert s.endpoint_url == "http://127.0.0.1:9000"
    assert s.effective_addressing_style == "path"  # custom endpoint → path-style
    # A config section wins over the environment; None values fall back to it.
    s2 = S3Settings.load({"endpoint_url": "http://10.0.0.1:7480", "region": None}, env)
    assert s2.endpoint_url == "http://10.0.0.1:7480" and s2.region == "eu-west-1"
    # AWS_ENDPOINT_URL_S3 is more specific than AWS_ENDPOINT_URL.
    s3 = S3Settings.from_env({**env, "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9999"})
    assert s3.endpoint_url == "http://127.0.0.1:9999"
    assert S3Settings.from_env({}).effective_addressing_style == "auto"


def test_settings_reject_unknown_keys_without_echoing_secrets():
    with pytest.raises(ValueError) as info:
        S3Settings.load({"endpoint": "http://x", "secret_access_key": SECRET,
                         "addressing_style": "sideways"}, environ={})
    msg = str(info.value)
    assert "endpoint" in msg and "addressing_style" in msg and "Known keys" in msg
    assert SECRET not in msg


def test_secrets_never_in_repr_or_dump():
    s = S3Settings(access_key_id="AKIA1234567890", secret_access_key=SECRET,
                   session_token="tok-abcdef")
    for text in (repr(s), str(s), s.model_dump_json(), str(s.model_dump(mode="json")),
                 s.describe()):
        assert SECRET not in text and "tok-abcdef" not in text
    assert "7890" in s.describe() and "AKIA1234567890" not in s.describe()


def test_storage_options_for_loopback_server():
    s = S3Settings(endpoint_url="http://127.0.0.1:9000", access_key_id="k",
                   secret_access_key=SECRET, region="us-east-1")
    opts = storage_options_for("s3://bucket/prefix", s)
    assert opts == {
        "key": "k",
        "secret": SECRET,
        "endpoint_url": "http://127.0.0.1:9000",
        # region in botocore's Config (== AWS_DEFAULT_REGION), never client_kwargs
        "config_kwargs": {"s3": {"addressing_style": "path"}, "region_name": "us-east-1"},
    }
    assert storage_options_for("/local/path", s) == {}
    assert storage_options_for("file:///x", s) == {}
    assert is_s3_uri("S3://b/k") and is_s3_uri("s3a://b") and not is_s3_uri("./s3/x")


def test_redact_scrubs_secrets_but_keeps_tokenizer_fields():
    record = {
        "storage_options": {"key": "AKIA", "secret": SECRET, "endpoint_url": "http://h:1"},
        "hf_token": "hf_" + "a" * 34,
        "Authorization": "Bearer abc.def",
        "nested": [{"session_token": "t0k3n-xyz"}, ("x", SecretStr("zzz-secret"))],
        "uri": "s3://user:pa55word@bucket/key",
        "note": f"failed with {SECRET} and hf_{'b' * 30}",
        "pad_token_id": 0,
        "files": {"tokenizer.json": 12, "tokenizer_config.json": 3},
        "empty_token": None,
    }
    out = redact(record, secrets=[SECRET])
    text = repr(out)
    for secret in (SECRET, "hf_aaaa", "abc.def", "t0k3n-xyz", "zzz-secret", "pa55word",
                   "hf_bbbb"):
        assert secret not in text, secret
    assert out["storage_options"]["endpoint_url"] == "http://h:1"
    assert out["storage_options"]["key"] == REDACTED
    assert out["uri"] == f"s3://{REDACTED}@bucket/key"
    assert out["pad_token_id"] == 0
    assert out["files"] == {"tokenizer.json": 12, "tokenizer_config.json": 3}
    assert out["empty_token"] is None
    assert isinstance(out["nested"][1], tuple)
    assert record["storage_options"]["secret"] == SECRET  # the input is not modified


# ------------------------------------------------------------------------------------------
# real servers
# ------------------------------------------------------------------------------------------


@pytest.fixture(params=["moto", "nanio"])
def any_bucket(request):
    """The same tests against moto (in RAM, lenient) and nanio (disk, checks SigV4)."""
    return request.getfixturevalue("s3_bucket" if request.param == "moto" else "nanio_bucket")


def test_roundtrip_and_ranged_reads(any_bucket):
    uri, _, server = any_bucket
    # Options built from the AWS_* variables the fixture set, as production code does.
    opts = storage_options_for(uri)
    assert opts["endpoint_url"] == server.endpoint_url
    assert "client_kwargs" not in opts
    payload = bytes(range(256)) * 4096  # 1 MiB
    storage.write_bytes_atomic(storage.join(uri, "a/blob.bin"), payload, **opts)
    assert storage.read_bytes(storage.join(uri, "a/blob.bin"), **opts) == payload
    assert storage.read_bytes(storage.join(uri, "a/blob.bin"), 1000, 1016, **opts) \
        == payload[1000:1016]
    assert storage.read_bytes(storage.join(uri, "a/blob.bin"), len(payload) - 5, None, **opts) \
        == payload[-5:]
    assert storage.size(storage.join(uri, "a/blob.bin"), **opts) == len(payload)
    # A multipart upload (parts of >= 5 MiB) through s3fs directly.
    fs, path = storage.get_fs(uri, **opts)
    big = os.urandom(1 << 16) * 256  # 16 MiB
    with fs.open(f"{path}/big.bin", "wb", block_size=5 << 20) as f:
        for i in range(0, len(big), 1 << 20):
            f.write(big[i:i + (1 << 20)])
    assert fs.cat_file(f"{path}/big.bin", start=(11 << 20) - 3, end=(11 << 20) + 3) \
        == big[(11 << 20) - 3:(11 << 20) + 3]
    etag = fs.info(f"{path}/big.bin")["ETag"].strip('"')
    assert etag.endswith(("-3", "-4")), etag  # a multipart ETag: md5-of-md5s + part count


def test_nanio_wrong_credentials_give_a_clear_error(nanio_bucket, monkeypatch):
    uri, _, server = nanio_bucket
    verify_s3_access(uri)  # right credentials from the environment: no error
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)  # wrong secret
    with pytest.raises(PermissionError) as info:
        verify_s3_access(uri)
    msg = str(info.value)
    assert uri in msg and server.endpoint_url in msg
    assert "AWS_ACCESS_KEY_ID" in msg and "AWS_SECRET_ACCESS_KEY" in msg
    assert SECRET not in msg
    # The storage layer also refuses, naming the URI.
    with pytest.raises(PermissionError) as info:
        storage.write_bytes_atomic(storage.join(uri, "x"), b"1", **storage_options_for(uri))
    assert uri in str(info.value) and SECRET not in str(info.value)


def test_explain_s3_error_for_missing_bucket_and_dead_endpoint(s3_bucket, monkeypatch):
    with pytest.raises(FileNotFoundError, match="s3://no-such-bucket-here"):
        verify_s3_access("s3://no-such-bucket-here/x")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: nothing there
    err = explain_s3_error(ConnectionError("Could not connect"), "s3://b/k")
    assert isinstance(err, ConnectionError) and "http://127.0.0.1:9" in str(err)


def test_nanio_restart_keeps_data_and_endpoint(tmp_path):
    with nanio_s3_server(tmp_path / "data") as server:
        opts = server.storage_options()
        fs, _ = storage.get_fs("s3://keep", **opts)
        fs.mkdir("keep")
        fs.pipe_file("keep/obj", b"persisted")
        endpoint, pid = server.endpoint_url, server.pid
        server.restart()
        assert server.endpoint_url == endpoint and server.pid != pid
        assert not process_group_alive(pid)
        assert storage.read_bytes("s3://keep/obj", **opts) == b"persisted"


def _children() -> set[int]:
    """PIDs whose parent is this process (Linux /proc)."""
    me, out = os.getpid(), set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == me:
                out.add(int(entry))
    return out


def test_servers_stop_their_whole_process_group(tmp_path):
    before = _children()
    with moto_s3_server() as moto, nanio_s3_server(tmp_path) as nanio:
        pids = [moto.pid, nanio.pid]
        assert all(process_group_alive(p) for p in pids)
        assert set(pids) <= _children()
        assert moto.start_seconds < 30 and nanio.start_seconds < 30
    assert not any(process_group_alive(p) for p in pids)
    assert _children() <= before


def test_server_killed_and_restarted(tmp_path):
    with nanio_s3_server(tmp_path) as server:
        pid = server.pid
        server.kill()  # a crash: SIGKILL, no cleanup
        assert not server.running and not process_group_alive(pid)
        server.start()
        assert server.running
    assert not server.running


def test_start_failure_reports_server_output(monkeypatch):
    monkeypatch.delenv("NANIO_ACCESS_KEY", raising=False)
    monkeypatch.delenv("NANIO_SECRET_KEY", raising=False)
    nanio = nanio_s3_server("/tmp")
    # Same command without credentials: nanio refuses to start and says why.
    broken = S3Server(name="nanio", argv=nanio.argv, access_key="k", secret_key="s", env={},
                      ready_timeout=20)
    with pytest.raises(ServerStartError) as info:
        broken.start()
    msg = str(info.value)
    assert "exited with code" in msg and "nanio serve" in msg
    assert "NANIO_ACCESS_KEY" in msg or "credential" in msg.lower()
    assert not broken.running


def test_stop_is_safe_when_the_group_ignores_sigterm():
    # A stubborn server: its child ignores SIGTERM, so stop() must fall back to SIGKILL.
    code = ("import signal,subprocess,sys,time,http.server,threading;"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN);"
            "subprocess.Popen([sys.executable,'-c','import signal,time;"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN);time.sleep(60)']);"
            "http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])),"
            " http.server.BaseHTTPRequestHandler).serve_forever()")
    server = S3Server(name="stubborn", argv=[sys.executable, "-c", code, "{port}"],
                      access_key="k", secret_key="s")
    server.start()
    pgid = server.pid
    server.stop(timeout=1.0)
    assert not process_group_alive(pgid)  # the SIGTERM-ignoring grandchild included
