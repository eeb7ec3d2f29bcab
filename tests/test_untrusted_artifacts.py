"""A run's artifacts are untrusted input: every kind of file that would cost memory, disk or a
hang is refused in one line, before torch.load reads it or a download copies it, through both
readers (the fast SQLite reader and MlflowClient)."""
import os
import pickle
import sqlite3
import warnings
import zipfile
from contextlib import closing

import pytest
import torch
from mlflow import MlflowClient

from conftest import slow_cases
from harness import runs
from harness.errors import HarnessError
from harness.fast.local_store import read_client as fast_read_client
from harness.urls import local_folder
from test_audit import mlflow_uri, searched  # noqa: F401 - fixtures
from test_fast_read import VALUES, _artifact, _sql, _within, store  # noqa: F401 - a fixture

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


def _moved(store, monkeypatch, relative: str):
    """The run's artifact folder moved to ``relative`` under the store's folder, the working directory."""
    path = store[0]
    monkeypatch.chdir(path)
    target = path / relative
    target.parent.mkdir(parents=True)
    _artifact(store, "").rename(target)
    return target


def _symlinked(store):
    path = store[0]
    (path / "linked").symlink_to(path / "mlruns")
    return str(path / "linked" / _artifact(store, "").relative_to(path / "mlruns"))


# Each form of a local artifact URI MLflow accepts: (the run's artifact URI, the folder MLflow reads).
FORMS = {
    "file:// with %xx": lambda s, m: ("file://" + str(_artifact(s, "")).replace("/artifacts", "/%61rtifacts"),
                                      _artifact(s, "")),
    "path with %xx": lambda s, m: (str(_artifact(s, "")).replace("/artifacts", "/%61rtifacts"), _artifact(s, "")),
    "file: without //": lambda s, m: (f"file:{_artifact(s, '')}", _artifact(s, "")),
    "file://localhost": lambda s, m: (f"file://localhost{_artifact(s, '')}", _artifact(s, "")),
    "relative": lambda s, m: ("moved/artifacts", _moved(s, m, "moved/artifacts")),
    "symlinked folder": lambda s, m: (_symlinked(s), _artifact(s, "")),
    # MLflow reads a FILE: URI as a path relative to the working directory
    "upper-case FILE:": lambda s, m: (f"FILE://{_artifact(s, '')}", _moved(s, m, f"FILE:{_artifact(s, '')}")),
}


def _no_download(monkeypatch):
    """MLflow's download (the only thing that copies an artifact) fails the test if called."""
    import mlflow.artifacts

    copy = lambda *a, **k: pytest.fail("MLflow's download copied the artifact")  # noqa: E731
    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", copy)
    monkeypatch.setattr(MlflowClient, "download_artifacts", copy)


# The fast tier: one form a way MLflow resolves it (a URI, a relative path, a link, FILE: as a path).
@pytest.mark.parametrize("form", slow_cases(FORMS, slow=["path with %xx", "file: without //", "file://localhost"]))
def test_each_local_artifact_uri_form_is_checked_where_mlflow_reads_it_and_never_copied(store, monkeypatch, form):
    from harness.reproduce import reproduce

    path, run_id, uri = store
    artifact_uri, folder = FORMS[form](store, monkeypatch)
    _sql(store, "UPDATE runs SET artifact_uri = ? WHERE run_uuid = ?", artifact_uri, run_id)
    assert MlflowClient(uri).download_artifacts(run_id, "state_dict.pt", str(path)) == str(path / "state_dict.pt")
    assert (path / "state_dict.pt").read_bytes() == (folder / "state_dict.pt").read_bytes(), "not where MLflow reads"
    expected = runs.predict(run_id, VALUES, client=MlflowClient(uri))[1]
    _no_download(monkeypatch)
    for make in CLIENTS.values():
        assert torch.equal(runs.predict(run_id, VALUES, client=make(run_id, uri))[1], expected)
    _sparse(folder / "state_dict.pt", 3 << 30)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load read it"))
    refused = f"refused state_dict.pt of run {run_id}: it is {3 << 30} bytes"
    for make in CLIENTS.values():
        with pytest.raises(HarnessError, match=refused):
            runs.predict(run_id, VALUES, client=make(run_id, uri))
    with pytest.raises(HarnessError, match=refused):
        runs.load_model(run_id, client=MlflowClient(uri))
    with pytest.raises(HarnessError, match=refused):
        reproduce(MlflowClient(uri), run_id)


def test_an_audit_refuses_a_sparse_state_dict_behind_a_percent_uri_without_copying_it(searched, monkeypatch):
    from harness.search.durable.audit import audit
    from test_audit import _reopened, _run_of

    url, client = searched
    run_id = _run_of(url, 0)
    artifact_uri = client.get_run(run_id).info.artifact_uri
    folder = local_folder(artifact_uri)
    assert (folder / "state_dict.pt").is_file()
    with closing(sqlite3.connect("mlflow.db")) as db, db:  # the store the fixture made in the working directory
        db.execute("UPDATE runs SET artifact_uri = ? WHERE run_uuid = ?",
                   (artifact_uri.replace("/artifacts", "/%61rtifacts"), run_id))
    _sparse(folder / "state_dict.pt", 3 << 30)
    _no_download(monkeypatch)
    report = audit(*_reopened(url), MlflowClient(client.tracking_uri))
    assert f"trial 0: refused state_dict.pt of run {run_id}: it is {3 << 30} bytes" in " ".join(report.violations)


def _many_entries(path, count: int, name_bytes: int = 1):
    path.unlink()
    with zipfile.ZipFile(path, "w") as archive:
        for i in range(count):
            archive.writestr(f"{i:0{name_bytes}d}", b"")


@pytest.mark.parametrize("bound", ["entries", "directory bytes"])
def test_an_archive_of_many_entries_is_refused_before_zipfile_reads_its_directory(store, monkeypatch, bound):
    path, run_id, uri = store
    monkeypatch.setattr(runs, "MAX_ARCHIVE_ENTRIES", 100)
    monkeypatch.setattr(runs, "MAX_DIRECTORY_BYTES", 100 * 128)
    if bound == "entries":
        _many_entries(_artifact(store, "state_dict.pt"), 101)
    else:  # few entries, each with a long name
        _many_entries(_artifact(store, "state_dict.pt"), 50, name_bytes=300)
    monkeypatch.setattr(zipfile, "ZipFile", lambda *a, **k: pytest.fail("zipfile read the directory"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load read it"))
    for make in CLIENTS.values():
        with pytest.raises(HarnessError, match=f"refused state_dict.pt of run {run_id}: its directory declares "
                                               r"(101|50) entries in \d+ bytes, at most 100 entries"):
            runs.predict(run_id, VALUES, client=make(run_id, uri))


@pytest.mark.slow
def test_torch_s_archives_of_as_many_tensors_as_the_bound_allows_are_read(tmp_path):
    path = tmp_path / "state_dict.pt"
    torch.save({f"layer{i}.weight": torch.zeros(1) for i in range(runs.MAX_ARCHIVE_ENTRIES - 6)}, path)
    assert runs._not_a_plain_archive(path) is None
    torch.save({f"layer{i}.weight": torch.zeros(1) for i in range(runs.MAX_ARCHIVE_ENTRIES - 5)}, path)
    assert "20001 entries" in runs._not_a_plain_archive(path)


def test_end_records_zipfile_and_torch_could_read_differently_are_refused(tmp_path):
    path = tmp_path / "state_dict.pt"
    torch.save({"weights": torch.zeros(1)}, path)
    data = path.read_bytes()
    path.write_bytes(data[:-2] + b"\x01\x00x")  # a comment after the end record
    assert "not a zip end record without a comment" in runs._not_a_plain_archive(path)
    locator = len(data) - 42
    moved = data[:locator + 8] + (len(data) - 99).to_bytes(8, "little") + data[locator + 16:]
    path.write_bytes(moved)  # the locator points at another zip64 record than the one before it
    assert "zip64 end record is not where its locator says" in runs._not_a_plain_archive(path)


def _with_pickle(path, pickled: bytes) -> None:
    """The torch archive at ``path`` with its pickle (data.pkl) replaced, stored as torch stores it."""
    with zipfile.ZipFile(path) as archive:
        entries = [(info, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for info, data in entries:
            archive.writestr(info.filename, pickled if info.filename.endswith("data.pkl") else data)


def test_a_pickle_that_would_cost_gigabytes_to_unpickle_is_refused_before_torch_reads_it(store, monkeypatch):
    """A list of lists unpickles at ~45x its size: an archive that passes every other bound carried a
    40 MB pickle that took 1.75 GB and 25 s before torch refused what it held."""
    path, run_id, uri = store
    monkeypatch.setattr(runs, "MAX_PICKLE_BYTES", 4096)
    _with_pickle(_artifact(store, "state_dict.pt"), b"\x80\x02]" + b"]a" * 3000 + b".")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load read it"))
    for make in CLIENTS.values():
        with pytest.raises(HarnessError, match=f"refused state_dict.pt of run {run_id}: its pickle declares 6004 "
                                               "bytes, at most 4096 allowed"):
            runs.predict(run_id, VALUES, client=make(run_id, uri))


def test_the_file_torch_reads_is_the_file_checked_even_if_swapped_meanwhile(store, monkeypatch):
    """Another user of a shared store replaces state_dict.pt between the checks and the load: torch
    still reads the file that was checked (the same open file), never the one put in its place."""
    path, run_id, uri = store
    target = _artifact(store, "state_dict.pt")
    good = target.read_bytes()
    expected = runs.predict(run_id, VALUES, client=MlflowClient(uri))[1]
    checked = runs._not_a_plain_archive

    def check_then_swap(handle, *limit):
        refused = checked(handle, *limit)
        swapped = target.with_name("swapped")
        _protocol_4(swapped)  # a bare pickle: what the checks exist to keep from torch.load
        os.replace(swapped, target)
        return refused

    for make in CLIENTS.values():
        target.write_bytes(good)
        monkeypatch.setattr(runs, "_not_a_plain_archive", check_then_swap)
        assert torch.equal(runs.predict(run_id, VALUES, client=make(run_id, uri))[1], expected)
        monkeypatch.undo()


def _unicode(text: str) -> bytes:
    return b"X" + len(text.encode()).to_bytes(4, "little") + text.encode()


DEEP = 300_000  # the outside probe's: torch.load died of SIGSEGV (exit 139) hashing the key
# Each pickle torch's weights-only unpickler reads, nesting past the bound in another way.
NESTED = {
    "tuple as a key": b"\x80\x02})" + b"\x85" * DEEP + b"Ns.",
    "lists as a value": b"\x80\x02}" + _unicode("weights") + b"]" * DEEP + b"a" * (DEEP - 1) + b"s.",
    "dicts as values": b"\x80\x02}" + b"K\x00}" * DEEP + b"s" * DEEP + b".",
    "tuples through memo gets": b"\x80\x02}(Nq\x00" + b"h\x00\x85q\x00" * DEEP + b"Nu.",
    "a list filled after it is nested": b"\x80\x02}K\x00]q\x00\x85h\x00]a.",
    "a list put into itself": b"\x80\x02}K\x00]q\x00h\x00as.",
}


# Reading "dicts as values" to its refusal takes ~1 s a call (~5 s of the fast tier's 60): the whole suite runs it.
@pytest.mark.parametrize("kind", slow_cases(NESTED, slow=["dicts as values"]))
def test_a_pickle_nested_past_the_bound_is_refused_before_torch_reads_it(store, monkeypatch, kind):
    """Nesting that would overflow the C stack while torch's unpickler builds or hashes it is refused
    in one line by predict, load_model and reproduce: torch.load never sees the pickle."""
    from harness.reproduce import reproduce

    path, run_id, uri = store
    _with_pickle(_artifact(store, "state_dict.pt"), NESTED[kind])
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load read it"))
    refused = f"refused state_dict.pt of run {run_id}: its pickle (nests objects more than 100 deep|fills an object)"
    calls = [lambda: runs.predict(run_id, VALUES, client=make(run_id, uri)) for make in CLIENTS.values()]
    calls += [lambda: runs.load_model(run_id, client=MlflowClient(uri)), lambda: reproduce(MlflowClient(uri), run_id)]
    for call in calls:
        with pytest.raises(HarnessError, match=refused) as error:
            call()
        assert "\n" not in str(error.value)


def test_an_audit_refuses_a_deeply_nested_state_dict(searched, monkeypatch):
    from harness.search.durable.audit import audit
    from test_audit import _reopened, _run_of

    url, client = searched
    run_id = _run_of(url, 0)
    target = local_folder(client.get_run(run_id).info.artifact_uri) / "state_dict.pt"
    _with_pickle(target, NESTED["tuple as a key"])
    load = torch.load  # the other trial's state_dict is read as before
    monkeypatch.setattr(torch, "load", lambda handle, **k: pytest.fail("torch.load read it")
                        if os.path.samefile(handle.name, target) else load(handle, **k))
    report = audit(*_reopened(url), MlflowClient(client.tracking_uri))
    assert f"trial 0: refused state_dict.pt of run {run_id}: its pickle nests objects more than 100 deep" in \
        " ".join(report.violations)


@pytest.mark.slow  # whole trainings in-process
def test_a_deeply_nested_checkpoint_is_refused_and_training_starts_over(store, monkeypatch):
    """The checkpoints a run resumes from are read through the same checks as its state_dict."""
    from harness import resume
    from harness.schema import checkpoint_name

    path, run_id, uri = store
    for slot in resume.SLOTS:
        target = _artifact(store, checkpoint_name(slot))
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(_artifact(store, "state_dict.pt").read_bytes())
        _with_pickle(target, NESTED["dicts as values"])
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load read it"))
    said = []
    assert resume.latest(MlflowClient(uri), run_id, {}, None, notify=said.append) == (None, None)
    assert said == [f"checkpoint {checkpoint_name(slot)} of run {run_id} refused: its pickle nests objects more "
                    "than 100 deep" for slot in resume.SLOTS]


def test_nesting_up_to_the_bound_is_read_as_torch_save_writes_it(tmp_path):
    """The bound is far above what torch.save writes: a checkpoint of a model, its optimizer's state
    and a nested config passes the checks, as a tuple nested exactly 100 deep does; 101 is refused."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.zeros(1, 2)).sum().backward()
    optimizer.step()
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "config": {"layers": [[1, [2, (3,)]]], "lr": 0.1}, "rng": torch.get_rng_state()}, path)
    assert runs.archive_refusal(path, runs.MAX_STATE_DICT_BYTES) is None
    for depth, refused in ((100, None), (101, "its pickle nests objects more than 100 deep")):
        _with_pickle(path, b"\x80\x02)" + b"\x85" * depth + b".")
        assert runs.archive_refusal(path, runs.MAX_STATE_DICT_BYTES) == refused


@pytest.mark.slow
def test_the_nested_pickle_that_crashed_predict_is_one_line_in_a_real_process(store):
    """Without the check the process died of SIGSEGV (exit 139), printing nothing."""
    from conftest import cli_env, run_cli
    from test_bad_input import one_line_error

    path, run_id, uri = store
    _with_pickle(_artifact(store, "state_dict.pt"), NESTED["tuple as a key"])
    out = run_cli("predict", run_id, "--x", 1, cwd=path, env=cli_env(MLFLOW_TRACKING_URI=uri))
    line = one_line_error(out, 1)
    assert f"refused state_dict.pt of run {run_id}: its pickle nests objects more than 100 deep" in line


def test_torch_s_warnings_while_loading_a_state_dict_never_reach_the_user(store, capfd):
    """A state_dict of quantized tensors made torch print two multi-line UserWarnings before the refusal."""
    path, run_id, uri = store
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the same deprecation, here for making one
        weight = torch.quantize_per_tensor(torch.zeros(1, 1), 0.1, 0, torch.qint8)
    torch.save({"linear.weight": weight, "linear.bias": torch.zeros(1)}, _artifact(store, "state_dict.pt"))
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with pytest.raises(HarnessError, match=f"state_dict.pt of run {run_id} does not fit") as error:
            runs.predict(run_id, VALUES, client=fast_read_client(run_id, uri))
    assert "\n" not in str(error.value)
    assert [str(w.message) for w in shown] == [] and capfd.readouterr().err == ""


def test_a_pickle_torch_finds_under_an_upper_case_name_is_checked_as_any(tmp_path):
    """torch's zip reader finds archive/data.pkl whatever the case of its letters: an archive/DATA.PKL
    escaped the pickle's bound (torch.load read it)."""
    path = tmp_path / "state_dict.pt"
    torch.save({"weights": torch.zeros(1)}, path)
    with zipfile.ZipFile(path) as archive:
        entries = [(info.filename, archive.read(info)) for info in archive.infolist()]
    for pickled, refused in ((b"\x80\x02]" + b"N" * (runs.MAX_PICKLE_BYTES - 3) + b".", "its pickle declares"),
                             (NESTED["tuple as a key"], "its pickle nests objects more than 100 deep")):
        with zipfile.ZipFile(path, "w") as archive:
            for name, data in entries:
                archive.writestr(name.replace("data.pkl", "DATA.PKL"), pickled if name.endswith(".pkl") else data)
        assert runs.archive_refusal(path, runs.MAX_STATE_DICT_BYTES).startswith(refused)


def test_a_pickle_that_shares_one_object_into_an_exponential_one_is_refused(store, monkeypatch):
    """40 levels of (x, x) through memo gets: shallow and 400 bytes, but hashing or comparing it visits
    2**40 objects (a hang). Counted with its shared objects copied out, it is refused in one line."""
    path, run_id, uri = store
    doubling = b"\x80\x02}K\x01q\x00" + b"".join(b"h" + bytes([i]) + b"h" + bytes([i]) + b"\x86q" + bytes([i + 1])
                                                 for i in range(40)) + b"Ns."
    _with_pickle(_artifact(store, "state_dict.pt"), doubling)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load read it"))
    with pytest.raises(HarnessError, match=f"refused state_dict.pt of run {run_id}: its pickle holds more than "
                                           f"{runs.MAX_PICKLE_OBJECTS} objects"):
        runs.load_model(run_id, client=MlflowClient(uri))
