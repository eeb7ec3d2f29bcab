"""A run's artifacts are untrusted input: every kind of file that would cost memory, disk or a
hang is refused in one line, before torch.load reads it or a download copies it, through both
readers (the fast SQLite reader and MlflowClient)."""
import os
import pickle
import warnings
import zipfile

import pytest
import torch
from mlflow import MlflowClient

from harness import runs
from harness.errors import HarnessError
from harness.tracking import fast_read_client
from test_fast_read import VALUES, _artifact, _within, store  # noqa: F401 - a fixture

LIMIT = 1 << 16  # the tests lower the bound so that no case costs more than a few KB of real disk


def _sparse(path, size):
    path.unlink()
    with open(path, "wb") as handle:
        handle.truncate(size)  # a hole: the file claims `size` bytes and holds none


def _deflated_bomb(path):
    """A torch.save archive whose tensor entry is deflated: a few KB on disk, 64x the bound inflated."""
    torch.save({"weights": torch.zeros(LIMIT * 16), "bias": torch.zeros(1)}, path)
    with zipfile.ZipFile(path) as source:
        entries = [(info, source.read(info)) for info in source.infolist()]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as bomb:
        for info, data in entries:
            bomb.writestr(info.filename, data)
    assert path.stat().st_size < LIMIT


def _legacy(path):
    """torch's pre-1.6 format: storages are allocated at the sizes the pickle declares."""
    torch.save({"weights": torch.zeros(1), "bias": torch.zeros(1)}, path, _use_new_zipfile_serialization=False)


def _protocol_4(path):
    with open(path, "wb") as handle:
        pickle.dump({"weights": torch.zeros(1)}, handle, protocol=4)


BAD = {"sparse 1 GiB": lambda p: _sparse(p, 1 << 30), "fifo": lambda p: (p.unlink(), os.mkfifo(p)),
       "link to a device": lambda p: (p.unlink(), p.symlink_to("/dev/zero")),
       "deflated bomb": _deflated_bomb, "legacy format": _legacy, "bare pickle": _protocol_4}
CLIENTS = {"fast reader": lambda run_id, uri: fast_read_client(run_id, uri),
           "MlflowClient": lambda run_id, uri: MlflowClient(uri)}


def _spied(reader, run_id, uri, copied):
    """The reader (made in the calling thread: SQLite connections stay in theirs), noting each download."""
    client = CLIENTS[reader](run_id, uri)
    download = client.download_artifacts
    client.download_artifacts = lambda *a: copied.append(a[1]) or download(*a)
    return client


@pytest.mark.parametrize("reader", CLIENTS)
@pytest.mark.parametrize("kind", BAD)
def test_a_state_dict_that_would_cost_memory_disk_or_a_hang_is_refused_before_reading(store, monkeypatch, kind,
                                                                                       reader):
    path, run_id, uri = store
    monkeypatch.setattr(runs, "MAX_STATE_DICT_BYTES", LIMIT)
    BAD[kind](_artifact(store, "state_dict.pt"))
    copied, loaded = [], []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loaded.append(a) or pytest.fail("torch.load read it"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's two-line warning for a bare pickle is not shown
        with pytest.raises(HarnessError, match=run_id) as error:
            _within(20, lambda: runs.predict(run_id, VALUES, client=_spied(reader, run_id, uri, copied)))
    assert "state_dict.pt" in str(error.value) and "\n" not in str(error.value) and not loaded
    if reader == "MlflowClient" and kind in ("sparse 1 GiB", "fifo", "link to a device"):
        assert "state_dict.pt" not in copied, "copied before its size was checked"


@pytest.mark.parametrize("reader", CLIENTS)
def test_an_oversized_config_is_refused_before_it_is_copied(store, monkeypatch, reader):
    path, run_id, uri = store
    _sparse(_artifact(store, "config.json"), 1 << 30)
    copied = []
    with pytest.raises(HarnessError, match=f"run {run_id} has no readable config.json"):
        _within(20, lambda: runs.predict(run_id, VALUES, client=_spied(reader, run_id, uri, copied)))
    if reader == "MlflowClient":
        assert "config.json" not in copied


def test_a_plain_state_dict_still_loads_through_both_readers(store):
    path, run_id, uri = store
    for make in CLIENTS.values():
        inputs, outputs = runs.predict(run_id, VALUES, client=make(run_id, uri))
        assert outputs.shape[0] == len(VALUES)
