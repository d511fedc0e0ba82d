"""Issue 10 item 8: a checkpoint that carries code is refused with a message that names what it
carries and never reads as advice to turn the safety check off; torch's pickle-protocol warning
for such a file is silenced locally (a file that loads still passes its warnings on)."""

from __future__ import annotations

import builtins
import os
import subprocess
import warnings

import pytest
import torch

from medxray.errors import CheckpointError
from medxray.torchfile import pickle_globals, safe_torch_load


class _Payload:  # a plain Python object in a checkpoint (pickled as a class global)
    pass


def _reducer(func, args):
    class _Call:
        def __reduce__(self):
            return func, args

    return _Call()


CASES = {  # payload, pickle protocol (protocol 2 would rename subprocess for Python 2), the global named
    "os.system": (lambda: _reducer(os.system, ("echo this must never run",)), 2, "posix.system"),
    "os.system-proto3": (lambda: _reducer(os.system, ("echo this must never run",)), 3, "posix.system"),
    "os.system-proto4": (lambda: _reducer(os.system, ("echo this must never run",)), 4, "posix.system"),
    "eval": (lambda: _reducer(builtins.eval, ("1+1",)), 2, "eval"),
    "subprocess": (lambda: _reducer(subprocess.Popen, (["true"],)), 3, "subprocess.Popen"),
    "object": (lambda: _Payload(), 2, f"{__name__}._Payload"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_code_carrying_checkpoint_is_refused_naming_the_global(case, tmp_path):
    make, proto, culprit = CASES[case]
    path = tmp_path / f"{case}.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": make()}, path, pickle_protocol=proto)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(CheckpointError) as info:
            safe_torch_load(path)
    msg = str(info.value)
    assert "holds code or Python objects" in msg and "was refused" in msg, msg
    assert f"({culprit})" in msg, msg
    assert "False" not in msg and "weights_only" not in msg, "never suggest turning the check off: " + msg
    assert "\n" not in msg
    assert not [w for w in caught if "pickle protocol" in str(w.message)], "protocol warning of a refused file"


def test_a_plain_file_in_another_protocol_still_warns_and_loads(tmp_path):
    path = tmp_path / "plain3.pt"
    torch.save({"w": torch.ones(3)}, path, pickle_protocol=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        obj = safe_torch_load(path)
    assert torch.equal(obj["w"], torch.ones(3))
    assert any("pickle protocol 3" in str(w.message) for w in caught), "only a refused file's warning is dropped"


def test_a_plain_file_torch_cannot_read_safely_is_not_called_code(tmp_path):
    path = tmp_path / "plain4.pt"  # protocol 4 framing: torch's safe unpickler stops before any global
    torch.save({"w": torch.ones(3)}, path, pickle_protocol=4)
    with pytest.raises(CheckpointError) as info:
        safe_torch_load(path)
    msg = str(info.value)
    assert "was refused" in msg and "holds code" not in msg and "False" not in msg, msg
    assert "Unsupported operand" in msg, msg


def test_pickle_globals_reads_without_running(tmp_path):
    path = tmp_path / "g.pt"
    torch.save({"x": _reducer(os.system, ("touch " + str(tmp_path / "ran"),))}, path)
    assert "posix.system" in pickle_globals(path)
    assert not (tmp_path / "ran").exists()
