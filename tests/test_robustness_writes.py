"""Writing never loses work: a destination that cannot be written fails before any loading or quantizing, an
OSError while writing is one line naming the path with nothing partial left, SIGTERM/SIGINT during a save unwind
cleanly (exit 143/130), and temporaries of killed processes are removed by the next write to the destination."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import namedtuple
from pathlib import Path
from typing import Any

import pytest
from safetensors import SafetensorError

import lowbit
import lowbit.io.checkpoint as checkpoint
import lowbit.jobs
from conftest import make_model
from lowbit.algorithms.plans import uniform_plan
from lowbit.algorithms.rtn import quantize_rtn
from lowbit.atomic import _host, _signals_deferred, atomic_dir, remove_stale_temps
from lowbit.cli import main
from lowbit.errors import DestinationError
from lowbit.io.checkpoint import save_quantized


def _no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*a: Any, **k: Any) -> None:
        raise AssertionError("the model was loaded before the destination was checked")

    monkeypatch.setattr(lowbit.jobs, "load", refuse)


def _quantized(tok: Any) -> Any:
    model = make_model("llama", vocab=len(tok))
    quantize_rtn(model, uniform_plan(model, "q4_0"), progress=False)
    return model


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()  # reaped: a zombie would still count as alive
    return proc.pid


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------------------------------------- before the work


def test_parent_that_is_a_file_fails_before_loading(tiny_model_dir: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    _no_loading(monkeypatch)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DestinationError, match="not a directory"):
        lowbit.convert(tiny_model_dir, "q4_0", tmp_path / "file" / "sub" / "out")
    with pytest.raises(DestinationError, match="not a directory"):
        lowbit.convert_gguf(tiny_model_dir, tmp_path / "file" / "out.gguf", "q4_0")


def test_full_disk_fails_before_loading(tiny_model_dir: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    _no_loading(monkeypatch)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(DestinationError, match=r"not enough space for .*out: it needs about 0\.\d MB"):
        lowbit.convert(tiny_model_dir, "q4_0", tmp_path / "out")
    with pytest.raises(DestinationError, match="not enough space"):
        lowbit.convert_gguf(tiny_model_dir, tmp_path / "out.gguf")
    assert [p.name for p in tmp_path.iterdir()] == [tiny_model_dir.name]


def test_read_only_destination_fails_before_loading(tiny_model_dir: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    _no_loading(monkeypatch)

    def read_only(*a: Any, **k: Any) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(DestinationError, match="is not writable .Read-only file system"):
        lowbit.convert(tiny_model_dir, "q4_0", tmp_path / "new" / "out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_unwritable_folder_fails_before_loading(tiny_model_dir: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    _no_loading(monkeypatch)
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    try:
        with pytest.raises(DestinationError, match="not writable"):
            lowbit.convert(tiny_model_dir, "q4_0", ro / "out")
    finally:
        ro.chmod(0o755)


# ------------------------------------------------------------------------------------------------ while writing


@pytest.mark.parametrize("failure", ["enospc", "safetensors"])
def test_write_error_is_one_line_and_leaves_nothing(failure: str, tiny_tokenizer: Any, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def half_write(tensors: Any, path: str, metadata: Any = None) -> None:
        Path(path).write_bytes(b"\0" * 1000)  # what a full disk leaves: part of the file
        if failure == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint, "save_file", half_write)
    with pytest.raises(DestinationError, match=r"cannot write .*q: .*No space left on device.*nothing was written"):
        lowbit.save(_quantized(tiny_tokenizer), tiny_tokenizer, tmp_path / "q")
    assert list(tmp_path.iterdir()) == []


def test_gguf_write_error_leaves_nothing(tiny_tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gguf

    def read_only(self: Any, *a: Any, **k: Any) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", read_only)
    with pytest.raises(DestinationError, match="Read-only file system"):
        lowbit.export_gguf(make_model("llama", vocab=len(tiny_tokenizer)), tiny_tokenizer, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_cli_write_error_is_exit_2(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    def full(*a: Any, **k: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint, "save_file", full)
    out = tmp_path / "out"
    assert main(["quantize", str(tiny_model_dir), "-f", "q4_0", "-o", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err  # after transformers' loading bar: lowbit's one line, last
    assert err.endswith("\n") and err.count("lowbit:") == 1 and "Traceback" not in err
    assert err.splitlines()[-1].startswith(f"lowbit: error: cannot write {out}: ") and "disk full" in err
    assert not out.exists() and _leftovers(tmp_path) == []


# ----------------------------------------------------------------------------------------- interrupts, leftovers

CHILD = """
import signal, sys, time
import lowbit.io.checkpoint as checkpoint
from lowbit.cli import main

signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even if the test runner ignores it

real = checkpoint.save_file
def slow(*a, **k):  # half of the checkpoint is on disk when the signal comes
    real(*a, **k)
    print("SAVING", flush=True)
    time.sleep(120)
checkpoint.save_file = slow
sys.exit(main(sys.argv[1:]))
"""


def _save_in_child(model_dir: Path, out: Path) -> subprocess.Popen:
    """A CLI quantize to ``out`` in a subprocess, paused with the checkpoint half written; its stderr goes to
    ``out``'s folder as child.err (a file: a full pipe could stall the child)."""
    argv = ["quantize", str(model_dir), "-f", "q4_0", "-o", str(out), "--no-progress", "--device", "cpu"]
    with (out.parent / "child.err").open("w") as err:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, *argv], stdout=subprocess.PIPE, stderr=err, text=True)
    for line in proc.stdout:
        if "SAVING" in line:
            return proc
    proc.wait()
    pytest.fail(f"the child never reached the save: {(out.parent / 'child.err').read_text()[-2000:]}")


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_during_save_unwinds_cleanly(sig: int, code: int, tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "q"
    proc = _save_in_child(tiny_model_dir, out)
    assert _leftovers(tmp_path)  # the temporary directory, half written
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == code
    err = (tmp_path / "child.err").read_text()
    assert "lowbit: interrupted; nothing was written" in err and "Traceback" not in err
    assert not out.exists() and _leftovers(tmp_path) == []


def test_killed_save_leftovers_are_removed_by_the_next_write(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "q"
    proc = _save_in_child(tiny_model_dir, out)
    proc.kill()  # SIGKILL: no handler runs, the temporary stays
    proc.wait(timeout=60)
    (stale,) = _leftovers(tmp_path)
    assert stale.startswith(f".q.tmp-{proc.pid}@")
    assert main(["quantize", str(tiny_model_dir), "-f", "q4_0", "-o", str(out), "--no-progress"]) == 0
    assert out.is_dir() and _leftovers(tmp_path) == []


def test_only_dead_local_writers_temporaries_are_removed(tiny_tokenizer: Any, tmp_path: Path) -> None:
    dead, host = _dead_pid(), _host()
    names = {"dead": f".q.tmp-{dead}@{host}-abc123", "live": f".q.tmp-{os.getpid()}@{host}-def456",
             "other host": f".q.tmp-{dead}@00000000-ghi789", "no owner": ".q.tmp-jkl012",
             "other destination": f".qq.tmp-{dead}@{host}-mno345"}
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"half")
    (tmp_path / f".q.tmp-{dead}@{host}-pqr678").write_bytes(b"half")  # a stale atomic_file temporary
    save_quantized(_quantized(tiny_tokenizer), tiny_tokenizer, tmp_path / "q")
    kept = set(names.values()) - {names["dead"]}
    assert set(_leftovers(tmp_path)) == kept


def test_interrupted_overwrite_gets_the_previous_output_back(tmp_path: Path) -> None:
    old = tmp_path / f".q.old-{_dead_pid()}@{_host()}"
    old.mkdir()
    (old / "lowbit.json").write_text("{}")
    assert remove_stale_temps(tmp_path / "q") == [old]
    assert (tmp_path / "q" / "lowbit.json").exists() and _leftovers(tmp_path) == []


def test_overwrite_keeps_the_old_output_until_the_new_one_is_complete(tmp_path: Path) -> None:
    final = tmp_path / "q"
    final.mkdir()
    (final / "v").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(final, overwrite=True) as tmp:
        (tmp / "v").write_text("2")
        raise RuntimeError
    assert (final / "v").read_text() == "1" and _leftovers(tmp_path) == []
    with atomic_dir(final, overwrite=True) as tmp:
        (tmp / "v").write_text("2")
    assert (final / "v").read_text() == "2" and _leftovers(tmp_path) == []


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_outputs_get_the_permissions_of_a_plain_write(umask: int, tiny_tokenizer: Any, tmp_path: Path) -> None:
    """A saved model folder and an exported GGUF are readable as a plain mkdir / open would leave them under the
    umask (not the private 0700 / 0600 of their temporaries: another account, a server's or a container's, must be
    able to read them), and an overwrite keeps the permissions of the output it replaces."""
    import stat

    from lowbit.io.gguf_export import export_gguf

    def mode(p: Path) -> int:
        return stat.S_IMODE(p.stat().st_mode)

    previous = os.umask(umask)
    try:
        model = _quantized(tiny_tokenizer)
        lowbit.save(model, tiny_tokenizer, tmp_path / "q")
        export_gguf(model, tiny_tokenizer, tmp_path / "q.gguf")
    finally:
        os.umask(previous)
    assert mode(tmp_path / "q") == 0o777 & ~umask and mode(tmp_path / "q" / "lowbit.json") == 0o666 & ~umask
    assert mode(tmp_path / "q.gguf") == 0o666 & ~umask
    (tmp_path / "q").chmod(0o750)
    (tmp_path / "q.gguf").chmod(0o640)
    lowbit.save(model, tiny_tokenizer, tmp_path / "q", overwrite=True)
    export_gguf(model, tiny_tokenizer, tmp_path / "q.gguf")
    assert mode(tmp_path / "q") == 0o750 and mode(tmp_path / "q.gguf") == 0o640
    os.umask(umask)
    try:  # a folder over a file: not the file's mode
        lowbit.save(model, tiny_tokenizer, tmp_path / "q.gguf", overwrite=True)
    finally:
        os.umask(previous)
    assert mode(tmp_path / "q.gguf") == 0o777 & ~umask


def test_signals_during_the_final_rename_are_delivered_after_it() -> None:
    done = []
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt), _signals_deferred():
            signal.raise_signal(signal.SIGINT)
            done.append("renamed")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert done == ["renamed"]


def test_overwriting_a_file_with_a_checkpoint_leaves_nothing_hidden(tiny_tokenizer: Any, tmp_path: Path) -> None:
    import lowbit

    out = tmp_path / "out"
    out.write_text("an earlier file in the way")
    lowbit.save(_quantized(tiny_tokenizer), tiny_tokenizer, out, overwrite=True)
    assert (out / "lowbit.json").exists() and _leftovers(tmp_path) == []


def test_info_refuses_a_checkpoint_without_weights(tiny_tokenizer: Any, tmp_path: Path, capsys) -> None:
    import lowbit
    from lowbit.cli import main

    out = lowbit.save(_quantized(tiny_tokenizer), tiny_tokenizer, tmp_path / "q")
    (out / "model.safetensors").unlink()
    assert main(["info", str(out)]) == 2
    assert "model.safetensors is missing" in capsys.readouterr().err


def test_generate_refuses_undecodable_prompt_bytes(tiny_model_dir: Path) -> None:
    argv = [sys.executable, "-m", "lowbit.cli", "generate", str(tiny_model_dir), "--device", "cpu", "-p", "-"]
    proc = subprocess.run(argv, input=b"caf\xe9 \xff\xfe", capture_output=True, timeout=120)
    assert proc.returncode == 2 and b"not valid UTF-8" in proc.stderr and b"Traceback" not in proc.stderr
