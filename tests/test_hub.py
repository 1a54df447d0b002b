"""push_folder and ``synthq push`` against a local stand-in for the Hub (tests/hub_server.py).

The real huggingface_hub makes the real requests; only the server is local. Xet is switched off so large files
take the LFS path the stand-in speaks (see hub_server.py).
"""

from __future__ import annotations

import argparse
import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub
import pytest
from datasets import Dataset, load_dataset
from hub_server import HubServer

from synthq_hf import hub, output
from synthq_hf.hub import HubPushError, add_push_command, push_folder

TOKEN = "hf_TestTokenThatMustNeverLeak0123456789"


@pytest.fixture
def hub_server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[HubServer]:
    """The stand-in Hub, with HF_ENDPOINT pointing at it and no token or offline flag leaking in from the machine."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # read at import: blocks localhost too
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-login"))
    with HubServer(token=TOKEN) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server
        assert server.unknown == [], f"huggingface_hub called routes the stand-in lacks: {server.unknown}"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A real output folder: three parquet shards in two configs, README.md with configs:, run.json, and a
    leftover hidden temp shard that must not be pushed."""
    out = output.prepare_folder(tmp_path / "out")
    rows = Dataset.from_dict({"prompt": ["a?", "b?", "c?"], "score": [1, 2, 3]})
    configs = {
        "instructions": {
            "train": output.write_split(rows.select([0, 1]), out, "instructions", "train"),
            "rejected": output.write_split(rows.select([2]), out, "instructions", "rejected"),
        },
        "demonstrations": {"train": output.write_split(rows, out, "demonstrations", "train")},
    }
    output.write_readme(out, configs, "# Test run")
    output.write_run_report(out, {"command": "test", "rows": 3})
    (out / "instructions" / ".train-00000.parquet.tmp").write_bytes(b"half-written")
    return out


def files_of(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and not p.name.startswith(".")
    }


def assert_token_hidden(caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str], *texts: str) -> None:
    out, err = capfd.readouterr()
    for text in (out, err, caplog.text, *texts):
        assert TOKEN not in text


def test_push_sends_exactly_the_folder(
    hub_server: HubServer, folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd
) -> None:
    caplog.set_level(logging.DEBUG)
    expected = files_of(folder)
    assert len([p for p in expected if p.endswith(".parquet")]) == 3

    url = push_folder(folder, "tester/synth", private=True, token=TOKEN, commit_message="first run")

    assert not huggingface_hub.constants.ENDPOINT.startswith(hub_server.url)  # HF_ENDPOINT was read at call time
    assert url == f"{hub_server.url}/datasets/tester/synth"
    repo = hub_server.repos["tester/synth"]
    assert repo.private is True
    assert repo.files == expected  # same paths, same bytes, no hidden temp shard
    assert [c.message for c in repo.commits] == ["first run"]
    assert sorted(repo.commits[0].lfs_paths) == sorted(p for p in expected if p.endswith(".parquet"))
    authed = {auth for method, _, auth in hub_server.requests if method != "PUT"}  # PUT: presigned, no bearer
    assert authed == {f"Bearer {TOKEN}"}
    assert_token_hidden(caplog, capfd)

    # What arrived is a dataset: written back out, load_dataset reads the same rows through the card's configs.
    pulled = tmp_path / "pulled"
    for path, data in repo.files.items():
        (pulled / path).parent.mkdir(parents=True, exist_ok=True)
        (pulled / path).write_bytes(data)
    rejected = load_dataset(str(pulled), "instructions", split="rejected", cache_dir=str(tmp_path / "cache"))
    assert rejected["prompt"] == ["c?"]


def test_public_by_default_and_repush_reuses_repo(hub_server: HubServer, folder: Path) -> None:
    push_folder(folder, "tester/synth", token=TOKEN)
    (folder / "run.json").write_text('{"rows": 4}\n')
    push_folder(folder, "tester/synth", token=TOKEN)  # exists: the 409 from create is fine

    repo = hub_server.repos["tester/synth"]
    assert repo.private is False
    assert len(repo.commits) == 2
    assert repo.files["run.json"] == b'{"rows": 4}\n'


def test_more_files_than_max_files_per_commit_make_several_commits(hub_server: HubServer, folder: Path) -> None:
    expected = files_of(folder)  # 5 files

    push_folder(folder, "tester/synth", token=TOKEN, commit_message="run", max_files_per_commit=2)

    commits = hub_server.repos["tester/synth"].commits
    assert [c.message for c in commits] == ["run (part 1/3)", "run (part 2/3)", "run (part 3/3)"]
    assert all(1 <= len(c.files) <= 2 for c in commits)
    assert {path: data for c in commits for path, data in c.files.items()} == expected
    assert "README.md" in commits[-1].files  # the card lands only once every shard it names is there
    assert not any(p.endswith(".parquet") for p in commits[-1].files)


def test_retries_429_and_412_then_succeeds(
    hub_server: HubServer, folder: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, capfd
) -> None:
    waits: list[float] = []
    monkeypatch.setattr(hub, "_sleep", waits.append)
    hub_server.fail_next_commits(429, retry_after="7")
    hub_server.fail_next_commits(412, times=2)

    push_folder(folder, "tester/synth", token=TOKEN, backoff_s=0.5)

    repo = hub_server.repos["tester/synth"]
    assert hub_server.commit_calls == 4
    assert len(repo.commits) == 1 and repo.files == files_of(folder)
    assert len([r for r in hub_server.requests if r[0] == "PUT"]) == 3  # retries re-send the commit, not the shards
    assert waits[0] == 7.0  # Retry-After honoured
    assert len(waits) == 3 and all(0 < w <= 0.5 * 2**i for i, w in enumerate(waits[1:], 1))
    assert_token_hidden(caplog, capfd)


def test_gives_up_after_max_retries_with_one_line(
    hub_server: HubServer, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hub, "_sleep", lambda s: None)
    hub_server.fail_next_commits(429, times=3)

    with pytest.raises(HubPushError) as info:
        push_folder(folder, "tester/synth", token=TOKEN, max_retries=2)

    message = str(info.value)
    assert "\n" not in message and "tester/synth" in message and "HTTP 429" in message
    assert hub_server.commit_calls == 3
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_server_text_in_errors_is_kept_but_the_token_redacted(
    hub_server: HubServer, folder: Path, caplog: pytest.LogCaptureFixture, capfd
) -> None:
    hub_server.fail_next_commits(400, message="Bad request:\n  header was {authorization}")

    with pytest.raises(HubPushError) as info:
        push_folder(folder, "tester/synth", token=TOKEN)

    message = str(info.value)
    assert message == "cannot push to dataset repo tester/synth: Bad request: header was Bearer *** (HTTP 400)"
    assert_token_hidden(caplog, capfd)


def test_no_token_says_how_to_log_in(hub_server: HubServer, folder: Path) -> None:
    with pytest.raises(HubPushError) as info:
        push_folder(folder, "tester/synth")

    message = str(info.value)
    assert "\n" not in message
    assert "hf auth login" in message and "huggingface-cli login" in message and "HF_TOKEN" in message
    assert hub_server.requests == []


def test_token_from_hf_token_env(hub_server: HubServer, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)

    push_folder(folder, "tester/synth")

    assert hub_server.repos["tester/synth"].files == files_of(folder)


@pytest.mark.parametrize(
    ("repo_id", "token", "status"),
    [("tester/synth", "hf_WrongTokenAlsoSecret42", 401), ("someone-else/synth", TOKEN, 403)],
)
def test_rejected_push_is_one_line_naming_the_repo(
    hub_server: HubServer,
    folder: Path,
    repo_id: str,
    token: str,
    status: int,
    caplog: pytest.LogCaptureFixture,
    capfd,
) -> None:
    caplog.set_level(logging.DEBUG)

    with pytest.raises(HubPushError) as info:
        push_folder(folder, repo_id, token=token)

    message = str(info.value)
    assert "\n" not in message and repo_id in message and f"HTTP {status}" in message
    assert token not in message
    assert not hub_server.repos
    assert_token_hidden(caplog, capfd, message)
    assert token not in caplog.text


def test_unreachable_hub_is_one_line(hub_server: HubServer, folder: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on once closed
        sock.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"

    with pytest.raises(HubPushError) as info:
        push_folder(folder, "tester/synth", token=TOKEN, endpoint=endpoint)

    message = str(info.value)
    assert "\n" not in message and "tester/synth" in message and f"cannot reach {endpoint}" in message
    assert hub_server.requests == []  # endpoint= wins over HF_ENDPOINT


def test_bare_repo_name_lands_in_the_token_namespace(hub_server: HubServer, folder: Path) -> None:
    url = push_folder(folder, "synth", token=TOKEN)

    assert url == f"{hub_server.url}/datasets/tester/synth"
    assert hub_server.repos["tester/synth"].files == files_of(folder)


def test_push_command(hub_server: HubServer, folder: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    parser = argparse.ArgumentParser(prog="synthq")
    add_push_command(parser.add_subparsers(dest="command", required=True))
    monkeypatch.setenv("MY_HUB_TOKEN", TOKEN)

    args = parser.parse_args(["push", str(folder), "tester/cli", "--private", "--token-env", "MY_HUB_TOKEN"])
    assert args.func(args) == 0
    assert hub_server.repos["tester/cli"].private is True
    assert f"{hub_server.url}/datasets/tester/cli" in capsys.readouterr().out

    args = parser.parse_args(["push", str(folder), "tester/cli", "--token-env", "UNSET_HUB_TOKEN"])
    assert args.func(args) == 2
    assert capsys.readouterr().err == "error: environment variable UNSET_HUB_TOKEN is not set\n"

    args = parser.parse_args(["push", str(folder), "tester/cli"])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no Hugging Face token") and err.count("\n") == 1
