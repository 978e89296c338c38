"""The converter's readers on hostile and damaged `.pth` / `.safetensors` files: clean one-line errors
naming the file and the tensor, never a read outside a storage, never foreign code run."""
import pathlib
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest
from safetensors.numpy import save_file

from clover_jax.convert.checkpoint_io import CheckpointFormatError, load_state_dict
from clover_jax.convert.safetensors_io import load_safetensors
from tests.hostile_files import (
    TensorSpec,
    pth_from_arrays,
    pth_pickle,
    reference_strided,
    rezip,
    safetensors_bytes,
    write_pth,
)

REPO = pathlib.Path(__file__).resolve().parents[2]
FOUR_FLOATS = np.arange(4, dtype=np.float32).tobytes()


def _one_tensor(tmp_path, *, numel=4, offset=0, size=(4,), stride=(1,), storage=FOUR_FLOATS, name="w.weight",
                storage_type="FloatStorage") -> pathlib.Path:
    spec = TensorSpec(name, "0", storage_type, numel, offset, list(size), list(stride))
    return write_pth(tmp_path / "bad.pth", pth_pickle([spec]), {"0": storage})


def _load_in_subprocess(path: pathlib.Path) -> subprocess.CompletedProcess:
    script = textwrap.dedent(f"""
        import sys
        from clover_jax.convert.checkpoint_io import CheckpointFormatError, load_state_dict
        try:
            sd = load_state_dict({str(path)!r})
        except CheckpointFormatError as err:
            print("clean error:", err)
            sys.exit(3)
        print("loaded", {{k: v.shape for k, v in sd.items()}})
    """)
    return subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_ten_million_elements_over_four_is_a_clean_error_not_a_segfault(tmp_path):
    path = _one_tensor(tmp_path, size=(10_000_000,))
    proc = _load_in_subprocess(path)
    assert proc.returncode == 3, (proc.returncode, proc.stderr[-2000:])  # a negative code would be a signal
    assert "clean error:" in proc.stdout and "'w.weight'" in proc.stdout and str(path) in proc.stdout
    assert "beyond its 4-element storage" in proc.stdout
    print(proc.stdout.strip())


def test_offset_two_to_the_forty_is_a_clean_error_not_stray_memory(tmp_path):
    path = _one_tensor(tmp_path, offset=2 ** 40)
    proc = _load_in_subprocess(path)
    assert proc.returncode == 3, (proc.returncode, proc.stderr[-2000:])
    assert "storage offset 1099511627776 lies beyond its 4-element storage" in proc.stdout
    print(proc.stdout.strip())


@pytest.mark.parametrize("kwargs, message", [
    (dict(stride=(-1,)), "negative"),
    (dict(size=(2, 2), stride=(2,)), "2 sizes but 1 strides"),
    (dict(size=(2, 3), stride=(3, 1)), "reach element 5"),
    (dict(size=(8,), stride=(0,)), "expanded view"),
    (dict(numel=5), "should hold 5 x 4 = 20 bytes but its archive entry has 16"),
    (dict(storage_type="ComplexFloatStorage"), "storage type ComplexFloatStorage"),
    (dict(size=(2 ** 62, 2 ** 62), stride=(1, 1)), "beyond its 4-element storage"),
    (dict(size=(1,) * 40, stride=(1,) * 40), "at most 32 dimensions"),
    (dict(size=(0, 2 ** 70), stride=(1, 1)), "more than any array can index"),  # fuzz finding, seed 2
])
def test_tensor_fields_that_lie_about_the_storage_are_refused(tmp_path, kwargs, message):
    path = _one_tensor(tmp_path, **kwargs)
    with pytest.raises(CheckpointFormatError, match=message) as info:
        load_state_dict(path)
    assert str(path) in str(info.value) and "'w.weight'" in str(info.value) and "\n" not in str(info.value)


def test_in_bounds_strided_views_and_byte_orders_read_like_torch(tmp_path):
    storage = np.arange(24, dtype=np.float32)
    specs = [TensorSpec("t", "0", "FloatStorage", 24, 2, [3, 4], [1, 5]),  # a transposed, offset view
             TensorSpec("s", "0", "FloatStorage", 24, 23, [], []),
             TensorSpec("e", "0", "FloatStorage", 24, 24, [0, 7], [7, 1])]
    path = write_pth(tmp_path / "ok.pth", pth_pickle(specs), {"0": storage.tobytes()})
    sd = load_state_dict(path)
    np.testing.assert_array_equal(sd["t"], reference_strided(storage, 2, [3, 4], [1, 5]))
    assert sd["s"] == 23 and sd["e"].shape == (0, 7)
    arrays = {"a": np.linspace(-1, 1, 6).reshape(2, 3), "b": np.arange(5, dtype=np.int16)}
    for order in ("little", "big"):
        got = load_state_dict(pth_from_arrays(tmp_path / f"{order}.pth", arrays, byteorder=order))
        for k, v in arrays.items():
            np.testing.assert_array_equal(got[k], v)
            assert got[k].dtype == v.dtype and got[k].dtype.isnative


def test_reduce_to_os_system_is_never_called(tmp_path):
    marker = tmp_path / "pwned"
    evil = b"".join([b"X\x04\x00\x00\x00evil", b"cos\nsystem\n(", b"X" + len(f"touch {marker}").to_bytes(4, "little"),
                     f"touch {marker}".encode(), b"tR"])
    spec = TensorSpec("w", "0", "FloatStorage", 4, 0, [4], [1])
    path = write_pth(tmp_path / "evil.pth", pth_pickle([spec], extra=evil), {"0": FOUR_FLOATS})
    sd = load_state_dict(path)
    assert list(sd) == ["w"] and not marker.exists()


def test_shared_tuple_chain_as_dict_key_is_refused_without_hashing_it(tmp_path):
    # t_{k+1} = (t_k, t_k): hashing t_60 would take 2^60 steps.
    chain = b"K\x01" + b"\x94" + b"h\x00h\x00\x86\x94" + b"".join(f"h{chr(i)}h{chr(i)}\x86\x94".encode("latin-1")
                                                                      for i in range(1, 60))
    evil_key = chain + b"K\x00"
    path = write_pth(tmp_path / "bomb.pth", b"\x80\x04}(" + evil_key + b"u.", {})
    with pytest.raises(CheckpointFormatError, match="dict key or set item of type tuple"):
        load_state_dict(path)


@pytest.mark.parametrize("case", ["dotdot", "duplicate", "two_pickles", "truncated", "lying_size", "not_zip",
                                  "missing_storage", "bad_byteorder", "pickle_garbage"])
def test_damaged_archives_fail_in_one_line(tmp_path, case):
    good = pth_from_arrays(tmp_path / "good.pth", {"w": np.ones(4, np.float32)})
    path = tmp_path / f"{case}.pth"
    if case == "dotdot":
        write_pth(path, zipfile.ZipFile(good).read("archive/data.pkl"),
                  {"0": FOUR_FLOATS}, extra_entries=[("archive/../../etc/x", b"")])
    elif case == "duplicate":
        with pytest.warns(UserWarning):  # zipfile warns on writing a duplicate name
            write_pth(path, zipfile.ZipFile(good).read("archive/data.pkl"), {"0": FOUR_FLOATS},
                      extra_entries=[("archive/data/0", FOUR_FLOATS)])
    elif case == "two_pickles":
        write_pth(path, zipfile.ZipFile(good).read("archive/data.pkl"), {"0": FOUR_FLOATS},
                  extra_entries=[("other/data.pkl", b"\x80\x02}.")])
    elif case == "truncated":
        path.write_bytes(good.read_bytes()[:-60])
    elif case == "lying_size":
        raw = bytearray(good.read_bytes())
        central = raw.rfind(b"PK\x01\x02archive"[:4])  # last central-directory record
        raw[central + 24:central + 28] = (10 ** 9).to_bytes(4, "little")  # uncompressed size
        path.write_bytes(bytes(raw))
    elif case == "not_zip":
        path.write_bytes(b"\x80\x02}q\x00.")  # a legacy raw pickle
    elif case == "missing_storage":
        with zipfile.ZipFile(good) as src, zipfile.ZipFile(path, "w") as dst:
            for info in src.infolist():
                if info.filename != "archive/data/0":
                    dst.writestr(info.filename, src.read(info))
    elif case == "bad_byteorder":
        rezip(path, good, {"archive/byteorder": b"middle"})
    elif case == "pickle_garbage":
        rezip(path, good, {"archive/data.pkl": b"\x80\x02}(X\x01\x00\x00\x00wcnumpy\ncore\n\x93."})
    with pytest.raises(CheckpointFormatError) as info:
        load_state_dict(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    print(case, "->", message)


def test_safetensors_reader_matches_the_reference_library(tmp_path):
    arrays = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.array([True, False]),
              "c": np.zeros((0, 3), np.int64), "d": np.float16(2.5) * np.ones((2, 1, 2), np.float16)}
    save_file(arrays, str(tmp_path / "ok.safetensors"))
    got = load_safetensors(tmp_path / "ok.safetensors")
    assert got.keys() == arrays.keys()
    for k, v in arrays.items():
        np.testing.assert_array_equal(got[k], v)
        assert got[k].dtype == v.dtype and got[k].shape == v.shape


@pytest.mark.parametrize("header, data, declared, message", [
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16, 2 ** 40, "header length"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, None, "outside the 8 data bytes"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 16, None, "needs 16 bytes"),
    ({"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8, None, "dtype 'C64'"),
    ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, None, "non-negative"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, None, "overlap"),
    ({"w": {"dtype": "F32", "shape": [2 ** 62, 2 ** 62], "data_offsets": [0, 4]}}, b"\0" * 4, None, "needs"),
    (b'{"w": 1, "w": 2}', b"", None, "duplicate"),
    (b"[1, 2]", b"", None, "not an object"),
    (b"{" * 100_000, b"", None, "not valid JSON"),
])
def test_safetensors_headers_that_lie_are_refused(tmp_path, header, data, declared, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(safetensors_bytes(header, data, declared_length=declared))
    with pytest.raises(CheckpointFormatError, match=message) as info:
        load_state_dict(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_convert_cli_reports_a_hostile_file_in_one_line(tmp_path):
    path = _one_tensor(tmp_path, size=(10_000_000,))
    proc = subprocess.run([sys.executable, "-m", "clover_jax.convert", "--source", "official_clover",
                           "--checkpoint", str(path), "--model", "tiny", "--out", str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "'w.weight'" in lines[0], proc.stderr
    print(lines[0])
    proc = subprocess.run([sys.executable, "-m", "clover_jax.convert", "--source", "official_clover",
                           "--checkpoint", str(tmp_path / "absent.pth"), "--out", str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr
