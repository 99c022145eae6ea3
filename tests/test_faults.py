"""Faults a run meets and the one line each gets: an output path that is a file, and writes the
storage refuses (no space, read-only, no permission), injected at the write and met for real on
a small tmpfs. A refused write loses nothing already saved, and --resume continues."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from hwft.checkpoint import verify_manifest
from tests.conftest import write_recipe


def steps_logged(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_an_output_dir_that_is_a_file_is_refused(tiny_llama, tmp_path, cli):
    (tmp_path / "taken").write_text("a file")
    path = write_recipe(tmp_path, tiny_llama, output={"dir": str(tmp_path / "taken")})
    code, _, err = cli("train", path)
    assert code == 2 and f"output.dir {tmp_path / 'taken'} is a file, not a folder; choose another output.dir" in err
    path = write_recipe(tmp_path, tiny_llama, output={"dir": str(tmp_path / "taken" / "run")})
    code, _, err = cli("train", path)
    assert code == 2 and "cannot write the output folder: a part of the path is a file, not a folder" in err
    assert "Traceback" not in err and (tmp_path / "taken").read_text() == "a file"


#: (the error, what the message says of it, and what to do)
REFUSALS = {
    "ENOSPC": (
        OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
        "no space left on the device",
        "free space on that disk",
    ),
    "EROFS": (
        OSError(errno.EROFS, os.strerror(errno.EROFS)),
        "the file system is read-only",
        "make that file system writable",
    ),
    "EACCES": (
        PermissionError(errno.EACCES, os.strerror(errno.EACCES)),
        "permission denied",
        "give yourself write permission there",
    ),
}


@pytest.mark.parametrize("kind", list(REFUSALS))
def test_a_refused_checkpoint_write_names_the_last_complete_one(tiny_llama, tmp_path, cli, monkeypatch, kind):
    """The storage refuses checkpoint step-2 (injected at its manifest, the last file written):
    one line naming it, why, the intact step-1 and how to continue; nothing half-written stays."""
    import hwft.checkpoint

    error, reason, fix = REFUSALS[kind]
    real, calls = hwft.checkpoint.write_manifest, []

    def refuse_the_second(folder: Path) -> None:
        calls.append(folder)
        if len(calls) == 2:
            error.filename = str(folder / "manifest.json")
            raise error
        real(folder)

    monkeypatch.setattr(hwft.checkpoint, "write_manifest", refuse_the_second)
    path = write_recipe(tmp_path, tiny_llama, train={"max_steps": 4, "save_every": 1})
    code, _, err = cli("train", path)
    run = tmp_path / "out"
    assert code == 2 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"hwft: error: cannot write checkpoint step-2: {reason} ({run / 'checkpoints'}/.step-2-tmp-")
    assert line.endswith(
        f"/manifest.json). The last complete checkpoint, {run / 'checkpoints' / 'step-1'}, is intact; "
        f"{fix}, then continue with: hwft train {path} --resume"
    )
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-1"]
    verify_manifest(run / "checkpoints" / "step-1")
    assert steps_logged(run) == [1, 2]
    if kind == "ENOSPC":  # space freed: the run continues from step-1 and ends as it would have
        monkeypatch.setattr(hwft.checkpoint, "write_manifest", real)
        code, _, err = cli("train", path, "--resume")
        assert code == 0, err
        assert steps_logged(run) == [1, 2, 3, 4] and (run / "adapter" / "adapter_model.safetensors").is_file()


def test_a_library_that_drops_the_errno_is_understood(tiny_llama, tmp_path, cli, monkeypatch):
    """tokenizers' and safetensors' Rust writers raise a plain Exception ending in '(os error N)':
    the result's save names the result and the cause, and the checkpoint the run had."""
    from transformers import PreTrainedTokenizerBase

    def refuse(self, folder, *args, **kwargs):
        if "adapter-tmp" in str(folder):  # the result, not a checkpoint
            raise Exception("No space left on device (os error 28)")  # noqa: TRY002 - what tokenizers raises
        return real(self, folder, *args, **kwargs)

    real = PreTrainedTokenizerBase.save_pretrained
    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", refuse)
    path = write_recipe(tmp_path, tiny_llama, train={"max_steps": 2, "save_every": 1})
    code, _, err = cli("train", path)
    run = tmp_path / "out"
    assert code == 2 and err.strip().splitlines()[-1] == (
        f"hwft: error: cannot write the result adapter/: no space left on the device. The last complete checkpoint, "
        f"{run / 'checkpoints' / 'step-1'}, is intact; free space on that disk, then continue with: hwft train {path} "
        "--resume"
    )
    assert not (run / "adapter").exists() and not list(run.glob(".adapter-tmp-*"))


def test_any_command_names_a_refused_write(lora_export_run, tmp_path, cli, monkeypatch):
    """Outside a run's own writes (here hwft export), the last resort of the CLI: the path and why."""

    def refuse(src, dst, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dst))

    monkeypatch.setattr(shutil, "copytree", refuse)
    code, _, err = cli("export", lora_export_run, "--to", "peft", "--out", tmp_path / "exported")
    assert code == 2 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"hwft: error: {tmp_path}/.exported-tmp-") and line.endswith(
        "/exported: the file system is read-only. Make that file system writable"
    ), line
    assert not list(tmp_path.glob(".exported-tmp-*"))


@pytest.fixture
def lora_export_run(tiny_llama, tmp_path, cli) -> Path:
    path = write_recipe(tmp_path, tiny_llama, train={"max_steps": 1})
    code, _, err = cli("train", path)
    assert code == 0, err
    return tmp_path / "out"


class Mounts:
    """tmpfs mounts in a mount namespace of this test process's own (unshare(2), as
    ``unshare -m`` does, with its mounts kept private): what a real full or read-only disk does
    to a run, without a subprocess. CI runs as root; elsewhere the test is skipped."""

    CLONE_NEWNS, MS_RDONLY, MS_REMOUNT, MS_REC, MS_PRIVATE = 0x20000, 1, 32, 16384, 1 << 18

    def __init__(self):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.mounted: list[Path] = []
        self.why_not = None
        if not sys.platform.startswith("linux"):
            self.why_not = "needs Linux mount namespaces"
        elif self.libc.unshare(self.CLONE_NEWNS) != 0:
            self.why_not = f"unshare(CLONE_NEWNS): {os.strerror(ctypes.get_errno())}"
        else:  # nothing mounted here may reach the machine's own namespace
            self._call(b"none", b"/", None, self.MS_REC | self.MS_PRIVATE, None)

    def _call(self, source, target, fstype, flags, data) -> None:
        if self.libc.mount(source, target, fstype, flags, data) != 0:
            raise OSError(ctypes.get_errno(), f"mount {target!r}: {os.strerror(ctypes.get_errno())}")

    def tmpfs(self, path: Path, size: str) -> None:
        self._call(b"hwft-test", str(path).encode(), b"tmpfs", 0, f"size={size}".encode())
        self.mounted.append(path)

    def remount(self, path: Path, size: str = "", read_only: bool = False) -> None:
        self._call(
            None,
            str(path).encode(),
            None,
            self.MS_REMOUNT | (self.MS_RDONLY if read_only else 0),
            f"size={size}".encode() if size else None,
        )

    def close(self) -> None:
        for path in reversed(self.mounted):
            self.libc.umount2(str(path).encode(), 2)  # MNT_DETACH


@pytest.fixture
def mounts():
    m = Mounts()
    if m.why_not:
        pytest.skip(m.why_not)
    yield m
    m.close()


def test_a_full_and_a_read_only_disk_for_real(tiny_llama, tmp_path, cli, mounts):
    """On a real tmpfs the disk fills while checkpoint step-2 is written (inside the tokenizer's
    save, where a user met it): the run stops in one line naming step-1; with space again,
    --resume ends with the very adapter an uninterrupted run writes. Then the disk is read-only;
    then a full disk explains MLX's writer, whose error names no cause."""
    from safetensors.numpy import load_file

    from hwft.storage import failed_write

    disk, full = tmp_path / "disk", tmp_path / "full"
    disk.mkdir(), full.mkdir()
    reference = write_recipe(
        tmp_path, tiny_llama, train={"max_steps": 4, "save_every": 1}, output={"dir": str(tmp_path / "reference")}
    )
    code, _, err = cli("train", reference)
    assert code == 0, err
    checkpoint = tmp_path / "reference" / "checkpoints" / "step-3"
    checkpoint_kib = sum(p.stat().st_blocks for p in checkpoint.rglob("*")) // 2
    raw = reference.read_text()
    recipe = tmp_path / "on-disk.yaml"
    recipe.write_text(raw.replace(str(tmp_path / "reference"), str(disk / "run")))
    mounts.tmpfs(disk, f"{checkpoint_kib * 3 // 2 + 64}k")  # checkpoint step-1 fits, step-2 does not

    code, _, err = cli("train", recipe)
    assert code == 2 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("hwft: error: cannot write checkpoint step-2: no space left on the device")
    assert line.endswith(
        f"The last complete checkpoint, {disk / 'run' / 'checkpoints' / 'step-1'}, is intact; free "
        f"space on that disk, then continue with: hwft train {recipe} --resume"
    )
    assert sorted(p.name for p in (disk / "run" / "checkpoints").iterdir()) == ["step-1"]

    mounts.remount(disk, size="64m")
    code, _, err = cli("train", recipe, "--resume")
    assert code == 0, err
    resumed = load_file(disk / "run" / "adapter" / "adapter_model.safetensors")
    uninterrupted = load_file(tmp_path / "reference" / "adapter" / "adapter_model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    assert all((resumed[k] == uninterrupted[k]).all() for k in resumed)  # fp32 on one CPU: the same bytes

    mounts.remount(disk, read_only=True)
    recipe.write_text(raw.replace(str(tmp_path / "reference"), str(disk / "new-run")))
    code, _, err = cli("train", recipe)
    assert code == 2 and err.strip().splitlines()[-1] == (
        f"hwft: error: cannot write the output folder: the file system is read-only ({disk / 'new-run'}). "
        "Make that file system writable"
    )

    mounts.tmpfs(full, "16k")
    with pytest.raises(OSError):
        (full / "filler").write_bytes(b"x" * 2**20)
    # MLX's writer says only "[write] Unable to write N bytes": the folder is asked why
    found = failed_write(RuntimeError("[write] Unable to write 6 bytes to file."), full)
    assert found is not None and found.errno == errno.ENOSPC
    mounts.remount(full, read_only=True)
    assert failed_write(RuntimeError("[save_safetensors] Failed to open file x"), full).errno == errno.EROFS


# ---------------------------------------------------------------------------- files cut short, ports taken


def cut(path: Path, keep: float = 0.5) -> None:
    """Leave the first part of ``path``, as an interrupted copy does."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize(
    "name,expected",
    [
        ("model.safetensors", "model.safetensors is cut short ("),
        ("config.json", "config.json is cut short"),
        ("tokenizer.json", "tokenizer.json is cut short"),
    ],
)
def test_a_model_folder_cut_short_is_one_line(tiny_llama, tmp_path, cli, name, expected):
    """A model folder whose weights, config or tokenizer an interrupted copy cut short: one line
    naming the folder and the file, exit 2, no output folder made."""
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    cut(model / name)
    code, _, err = cli("train", write_recipe(tmp_path, model))
    assert code == 2 and "Traceback" not in err, err
    assert f"{model}: {expected}" in err and "Copy or download it again" in err, err
    assert not (tmp_path / "out").exists()


def test_an_adapter_cut_short_is_one_line_for_training_and_for_chat(lora_export_run, tmp_path, cli):
    """The adapter of a finished run cut short: continuing it (model.adapter) and chatting with
    it each say which file, with exit 2."""
    adapter = lora_export_run / "adapter"
    cut(adapter / "adapter_model.safetensors", 0.3)
    code, _, err = cli("chat", lora_export_run, "--prompt", "hi")
    assert code == 2 and "Traceback" not in err, err
    assert f"adapter folder {adapter}: adapter_model.safetensors is cut short" in err, err
    model = yaml.safe_load((lora_export_run / "recipe.yaml").read_text())["model"]["name"]
    code, _, err = cli("train", write_recipe(tmp_path, {"name": model, "adapter": str(adapter)}))
    assert code == 2 and f"model.adapter: {adapter}: adapter_model.safetensors is cut short" in err, err


@pytest.mark.parametrize("command", ["serve", "board"])
def test_a_server_on_a_port_in_use_is_one_line(command, tmp_path, cli):
    """hwft serve and hwft board on a port something already listens on, or on an address that
    is not this machine's: one line naming --port or --host, exit 2, before any model loads."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        target = [] if command == "board" else [str(tmp_path / "no-run-yet")]
        code, _, err = cli(command, *target, "--port", port)
        assert code == 2 and "Traceback" not in err, err
        assert f"hwft {command}: port {port} on 127.0.0.1 is already in use" in err and "--port" in err, err
    code, _, err = cli(command, *target, "--host", "192.0.2.1", "--port", port)  # TEST-NET-1: never this machine's
    assert code == 2 and f"hwft {command} --host 192.0.2.1: not an address of this machine" in err, err
