"""Crash-safe writes (elsa_codec.format.atomic): a failure or a kill at every step of a single-file
or sharded write leaves the previous checkpoint loadable; output targets are checked."""
import errno
import multiprocessing
import os
import socket

import pytest
import torch
from safetensors.torch import save_file as st_save

import elsa_codec as ec
from elsa_codec import ELSAError, ELSAFormatError
from elsa_codec.format import atomic
from elsa_codec.format.atomic import stale_temporaries


def _enc(seed: int, n: int = 4):
    g = torch.Generator().manual_seed(seed)
    sd = {f"l{i}.weight": torch.randn(24, 16, generator=g) for i in range(n)}
    sd["l0.bias"] = torch.randn(24, generator=g)
    return ec.encode(sd, ec.magnitude_counters(sd, [0.75, 0.5]))


def _same(got, want):
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def _listing(folder) -> list:
    return sorted(os.listdir(folder))


def _steps(fn) -> list:
    """The fault-injection steps a write runs through (recorded, nothing injected)."""
    seen = []
    atomic._fault = seen.append
    try:
        fn()
    finally:
        atomic._fault = None
    return seen


class _Fault(OSError):
    pass


def _at(step: str, index: int, act):
    """A fault hook that runs ``act`` at the ``index``-th step of a write, which must be ``step``
    (step names repeat: ``fsync-dir``)."""
    calls = []

    def hook(s):
        calls.append(s)
        if len(calls) - 1 == index:
            assert s == step, (s, step)
            act()
    return hook


def _enospc():
    raise _Fault(errno.ENOSPC, "No space left on device (injected)")


def _kill():
    os._exit(17)


def _in_child(hook, fn) -> int:
    """Run ``fn`` in a forked process with the fault hook set; its exit code."""
    def child():
        torch.set_num_threads(1)
        atomic._fault = hook
        fn()
        os._exit(0)
    p = multiprocessing.get_context("fork").Process(target=child)
    p.start()
    p.join(60)
    return p.exitcode


def _save_sharded(enc, idx):
    return lambda: ec.save_file(enc, idx, max_shard_size=1600)


def test_sharded_steps_order(tmp_path):
    idx = str(tmp_path / "model.safetensors.index.json")
    ec.save_file(_enc(0), idx, max_shard_size=1600)
    steps = _steps(_save_sharded(_enc(1), idx))
    kinds = [s.split(" ")[0] for s in steps]
    assert kinds.count("rename") >= 2, steps
    commit = steps.index("replace model.safetensors.index.json")
    assert max(i for i, k in enumerate(kinds) if k in ("write", "rename")) < commit  # every shard before the index
    assert kinds[commit - 1] == "fsync-dir" and kinds[commit + 1] == "fsync-dir"
    assert all(k in ("remove", "fsync-dir") for k in kinds[commit + 1:]) and "remove" in kinds[commit + 1:]
    writes = [i for i, k in enumerate(kinds) if k == "write"]
    assert len(writes) == kinds.count("rename") + 1  # every shard and the index
    assert all(steps[i + 1] == "fsync " + steps[i].split(" ", 1)[1] for i in writes)  # each flushed before any rename


def _others(folder) -> list:
    return [n for n in _listing(folder) if n != "scratch"]


def _inject(kind: str, step: str, fn, index: int) -> bool:
    """Run ``fn`` with a fault at ``step``: an ENOSPC error, or a kill of the writing process.
    True if the write went through anyway (a failed folder flush or an old shard's removal is
    not an error: the renames are atomic, the commit is done)."""
    if kind == "kill":
        assert _in_child(_at(step, index, _kill), fn) == 17, step
        return False
    swallowed = step.startswith(("fsync-dir", "remove"))
    atomic._fault = _at(step, index, _enospc)
    try:
        if swallowed:
            fn()
        else:
            with pytest.raises(_Fault):
                fn()
    finally:
        atomic._fault = None
    return swallowed


@pytest.mark.parametrize("kind", ["error", "kill"])
def test_sharded_overwrite_fault_at_every_step(tmp_path, kind):
    old, new = _enc(0), _enc(1)
    idx = str(tmp_path / "model.safetensors.index.json")
    ec.save_file(old, idx, max_shard_size=1600)
    files_old = _listing(tmp_path)
    scratch = tmp_path / "scratch"  # the steps of writing `new` over `old`, recorded on a copy
    ec.save_file(old, str(scratch / "model.safetensors.index.json"), max_shard_size=1600)
    steps = _steps(_save_sharded(new, str(scratch / "model.safetensors.index.json")))
    commit = steps.index("replace model.safetensors.index.json")
    assert len(steps) >= 12 and sum(s.startswith("remove") for s in steps) == len(files_old) - 1
    for i, step in enumerate(steps):
        went_through = _inject(kind, step, _save_sharded(new, idx), i)
        committed = went_through or i > commit
        _same(ec.load_file(idx), new if committed else old)
        if kind == "error" and not committed:
            assert _others(tmp_path) == files_old, step  # no temporary, no new shard left
        ec.save_file(old, idx, max_shard_size=1600)  # the next write cleans up what a kill left
        assert _others(tmp_path) == files_old, step
        assert stale_temporaries(idx) == []


@pytest.mark.parametrize("kind", ["error", "kill"])
def test_single_file_fault_at_every_step(tmp_path, kind):
    old, new = _enc(0), _enc(1)
    p = str(tmp_path / "m.safetensors")
    ec.save_file(old, p)
    steps = _steps(lambda: ec.save_file(new, str(tmp_path / "scratch.safetensors")))
    steps = [s.replace("scratch.safetensors", "m.safetensors") for s in steps]
    assert [s.split(" ")[0] for s in steps] == ["write", "fsync", "replace", "fsync-dir"]
    for i, step in enumerate(steps):
        _inject(kind, step, lambda: ec.save_file(new, p), i)
        _same(ec.load_file(p), new if step.startswith("fsync-dir") else old)
        if kind == "kill" and not step.startswith("fsync-dir"):
            assert len(stale_temporaries(p)) == 1  # what a kill leaves; `elsa verify` reports it
        ec.save_file(old, p)
        assert stale_temporaries(p) == [] and _listing(tmp_path) == ["m.safetensors", "scratch.safetensors"]


def test_disk_full_inside_a_shard_write_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    """ENOSPC from the write itself, after some bytes of the second shard are on disk."""
    from elsa_codec.format import file as ffile

    old, new = _enc(0), _enc(1)
    idx = str(tmp_path / "model.safetensors.index.json")
    ec.save_file(old, idx, max_shard_size=1600)
    before = {n: (tmp_path / n).read_bytes() for n in _listing(tmp_path)}
    real, calls = ffile.write_tensors, []

    def full_disk(path, tensors, metadata):
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as f:
                f.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, tensors, metadata)

    monkeypatch.setattr(ffile, "write_tensors", full_disk)
    with pytest.raises(OSError, match="No space left"):
        ec.save_file(new, idx, max_shard_size=1600)
    assert {n: (tmp_path / n).read_bytes() for n in _listing(tmp_path)} == before  # byte for byte, nothing added
    _same(ec.load_file(idx), old)


def test_stream_encode_sharded_overwrite_fault(tmp_path):
    """``elsa encode`` (encode_file) into a sharded output: a failure before the index swap keeps the old output."""
    g = torch.Generator().manual_seed(3)
    plain = str(tmp_path / "plain.safetensors")
    st_save({f"l{i}.weight": torch.randn(24, 16, generator=g) for i in range(4)}, plain)
    out = str(tmp_path / "out.safetensors.index.json")
    ec.encode_file(plain, out, levels=[0.5], max_shard_size=1600, progress=False)
    old = ec.load_file(out)
    files = _listing(tmp_path)
    steps = _steps(lambda: ec.encode_file(plain, str(tmp_path / "o2.safetensors.index.json"), levels=[0.75],
                                          max_shard_size=1600, progress=False))
    for i, step in enumerate(s.replace("o2", "out") for s in steps):
        if step.startswith(("remove", "fsync-dir")):
            continue
        _inject("error", step, lambda: ec.encode_file(plain, out, levels=[0.75], max_shard_size=1600, progress=False), i)
        _same(ec.load_file(out), old)
        assert [n for n in _listing(tmp_path) if not n.startswith("o2")] == files, step
    ec.encode_file(plain, out, levels=[0.75], max_shard_size=1600, progress=False)
    assert ec.load_file(out).meta.levels[0].sparsity == pytest.approx(0.75, abs=0.01)
    assert not any(n in _listing(tmp_path) for n in files if n.startswith("out-"))  # the old shards went


def test_shard_names_are_content_derived_and_reproducible(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        ec.save_file(_enc(0), str(d / "model.safetensors.index.json"), max_shard_size=1600)
    assert _listing(a) == _listing(b)
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in _listing(a))
    ec.save_file(_enc(1), str(b / "model.safetensors.index.json"), max_shard_size=1600)
    assert not set(_listing(a)) - {"model.safetensors.index.json"} & set(_listing(b))  # new content, new names
    shard = [n for n in _listing(a) if n != "model.safetensors.index.json"][0]
    assert shard.startswith("model-00001-of-") and len(shard.split("-")[-1]) == len("0123456789abcdef.safetensors")


def test_orphans_of_a_killed_write_and_foreign_files_in_the_folder(tmp_path):
    """Shards a killed write renamed (never indexed) go on the next write; other files stay."""
    idx = str(tmp_path / "model.safetensors.index.json")
    ec.save_file(_enc(0), idx, max_shard_size=1600)
    steps = _steps(_save_sharded(_enc(1), str(tmp_path / "scratch" / "model.safetensors.index.json")))
    last = max(i for i, s in enumerate(steps) if s.startswith("rename"))
    assert _in_child(_at(steps[last], last, _kill), _save_sharded(_enc(1), idx)) == 17
    orphans = [n for n in _listing(tmp_path) if n.startswith("model-") and n not in ec.format.file.used_shards(idx)]
    assert orphans
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "model-00001-of-00002.safetensors.bak").write_text("mine too")
    ec.save_file(_enc(2), idx, max_shard_size=1600)
    left = set(_listing(tmp_path))
    assert not set(orphans) & left and {"notes.txt", "model-00001-of-00002.safetensors.bak", "scratch"} <= left
    assert left - {"notes.txt", "model-00001-of-00002.safetensors.bak", "scratch"} == {
        "model.safetensors.index.json", *ec.format.file.used_shards(idx)}


def _fifo(p):
    os.mkfifo(p)
    return p


def _socket(p):
    s = socket.socket(socket.AF_UNIX)
    s.bind(p)
    return p


@pytest.mark.parametrize("make,kind", [(_fifo, "FIFO"), (_socket, "socket"), (os.mkdir, "directory")])
@pytest.mark.parametrize("sharded", [False, True], ids=["file", "index"])
def test_output_target_kinds_refused_before_any_work(tmp_path, make, kind, sharded):
    p = str(tmp_path / ("t.safetensors.index.json" if sharded else "t.safetensors"))
    make(p)
    before = _listing(tmp_path)
    with pytest.raises(ELSAError, match=kind):
        ec.save_file(_enc(0), p)
    assert _listing(tmp_path) == before


def test_character_device_refused(tmp_path):
    """/dev/null is never replaced (checked on a symlink-free path: the device itself)."""
    st = os.stat("/dev/null")
    with pytest.raises(ELSAError, match="character device"):
        ec.save_file(_enc(0), "/dev/null")
    assert os.stat("/dev/null").st_rdev == st.st_rdev and os.path.exists("/dev/null")


def test_symlink_target_is_replaced_not_followed(tmp_path):
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"keep me")
    link = tmp_path / "link.safetensors"
    link.symlink_to(other)
    ec.save_file(_enc(0), str(link))
    assert not link.is_symlink() and other.read_bytes() == b"keep me"
    _same(ec.load_file(str(link)), _enc(0))


def test_cli_refuses_fifo_output_before_reading(tmp_path, capsys):
    from elsa_codec.cli import main

    g = torch.Generator().manual_seed(0)
    plain = str(tmp_path / "plain.safetensors")
    st_save({"w": torch.randn(8, 8, generator=g)}, plain)
    fifo = _fifo(str(tmp_path / "out.safetensors"))
    assert main(["encode", plain, "-o", fifo, "--levels", "0.5"]) == 2
    assert "FIFO" in capsys.readouterr().err


def test_save_file_refuses_non_utf8_names_and_edited_tensors(tmp_path):
    enc = _enc(0)
    p = str(tmp_path / "m.safetensors")
    bad = ec.ELSAStateDict({**enc, "\udcffname": torch.zeros(2)}, enc.meta, enc.bn_stats)
    with pytest.raises(ELSAError, match="not valid Unicode"):
        ec.save_file(bad, p)
    edited = ec.ELSAStateDict({**enc, "l1.weight": enc["l1.weight"].half()}, enc.meta, enc.bn_stats)
    with pytest.raises(ELSAError, match=r"l1\.weight: the encoded tensor is torch.float16 .* cast"):
        ec.save_file(edited, p)
    reshaped = ec.ELSAStateDict({**enc, "l2.weight": enc["l2.weight"].reshape(16, 24)}, enc.meta, enc.bn_stats)
    with pytest.raises(ELSAError, match=r"l2\.weight: .*\[16, 24\]"):
        ec.save_file(reshaped, p)
    assert _listing(tmp_path) == []


def test_encode_refuses_shard_tensors_missing_from_the_weight_map(tmp_path):
    import json

    g = torch.Generator().manual_seed(0)
    st_save({"a.weight": torch.randn(8, 8, generator=g), "b.weight": torch.randn(8, 8, generator=g)},
            str(tmp_path / "in-1.safetensors"))
    idx = tmp_path / "in.safetensors.index.json"
    idx.write_text(json.dumps({"metadata": {}, "weight_map": {"a.weight": "in-1.safetensors"}}))
    with pytest.raises(ELSAFormatError, match=r"'b\.weight' that the index's weight_map does not list"):
        ec.encode_file(str(idx), str(tmp_path / "out.safetensors"), levels=[0.5], progress=False)
    assert not (tmp_path / "out.safetensors").exists()
