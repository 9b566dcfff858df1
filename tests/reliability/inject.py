"""Run a stage module with a fault injected: SIGKILL in the middle of writing one output file.

    python tests/reliability/inject.py <fault> -- <module> [args...]

Faults (each writes the FIRST HALF of the file's real bytes, fsyncs them, then SIGKILLs the
process, so a truncated file really is on disk when the process dies):
  write:<file name>        Path.write_text / Path.write_bytes of a file with that name
                           (prepare: train.jsonl; tokenization: report.json)
  safetensors:<substring>  safetensors.torch.save_file to a path containing <substring>
                           (a checkpoint: checkpoint-00000015)

Test-only: lives under tests/, patches nothing in the project's files.
"""
from __future__ import annotations

import os
import pathlib
import runpy
import signal
import sys


def _die_after_half(path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data[: max(1, len(data) // 2)])
        fh.flush()
        os.fsync(fh.fileno())
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(fault: str) -> None:
    kind, _, target = fault.partition(":")
    if kind == "write":
        write_text, write_bytes = pathlib.Path.write_text, pathlib.Path.write_bytes

        def patched_text(self, data, encoding=None, errors=None, newline=None):
            if self.name == target:
                _die_after_half(self, data.encode(encoding or "utf-8"))
            return write_text(self, data, encoding=encoding, errors=errors, newline=newline)

        def patched_bytes(self, data):
            if self.name == target:
                _die_after_half(self, bytes(data))
            return write_bytes(self, data)

        pathlib.Path.write_text, pathlib.Path.write_bytes = patched_text, patched_bytes
    elif kind == "safetensors":
        import safetensors.torch as st

        save_file = st.save_file

        def patched_save_file(tensors, filename, metadata=None):
            if target in str(filename):
                _die_after_half(filename, st.save(tensors, metadata=metadata))
            return save_file(tensors, filename, metadata=metadata)

        st.save_file = patched_save_file
    else:
        raise SystemExit(f"unknown fault {fault!r}")


if __name__ == "__main__":
    fault, sep, module, *args = sys.argv[1:]
    assert sep == "--", "usage: inject.py <fault> -- <module> [args...]"
    sys.path.insert(0, os.getcwd())  # the project under test, not tests/reliability
    install(fault)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
