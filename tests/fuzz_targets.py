"""Fuzz targets shared by the test suite (`test_fuzz_inputs.py`, a modest number of examples) and the long
campaign (`fuzz_campaign.py`): a hypothesis strategy and a check per untrusted input.

Each check feeds one generated input to a reader and accepts exactly two outcomes: it loads (and, where
an oracle exists, equals the oracle) or it raises our own error type. Anything else — another
exception, a hang (`HANG_SECONDS`), a crash of the interpreter — is a finding.
"""
from __future__ import annotations

import contextlib
import json
import pathlib
import signal
import tempfile
from typing import Any, Callable

import numpy as np
from hypothesis import strategies as st

from clover_jax.convert.checkpoint_io import CheckpointFormatError, load_state_dict
from tests.hostile_files import (
    STORAGE_OF,
    TensorSpec,
    pth_from_arrays,
    pth_pickle,
    reference_strided,
    safetensors_bytes,
    write_pth,
)

HANG_SECONDS = 20
WORK = pathlib.Path(tempfile.mkdtemp(prefix="clover_fuzz_"))
COUNTS: dict[str, int] = {}


class Hang(Exception):
    """An input took longer than HANG_SECONDS."""


@contextlib.contextmanager
def no_hang(seconds: int = HANG_SECONDS):
    def alarm(_signum, _frame):
        raise Hang(f"input still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _count(target: str) -> None:
    COUNTS[target] = COUNTS.get(target, 0) + 1


# ----------------------------------------------------------------------------- .pth: tensor fields

_INTS = st.one_of(st.integers(-3, 12), st.sampled_from([2 ** 31, 2 ** 40, 2 ** 62, 2 ** 63, 2 ** 64 + 1, -2 ** 63]))
_ANY_FIELDS = st.fixed_dictionaries({
    "storage_type": st.sampled_from(sorted(set(STORAGE_OF.values())) + ["BFloat16Storage", "QInt8Storage", "Nope"]),
    "storage_elems": st.integers(0, 24),
    "numel": st.one_of(st.integers(0, 30), _INTS),
    "offset": _INTS,
    "size": st.lists(_INTS, max_size=5),
    "stride": st.lists(_INTS, max_size=5),
    "ndim_match": st.booleans(),
})
# Plausible fields (what a real view looks like), so that many inputs load and are compared with the oracle.
_PLAUSIBLE_FIELDS = st.integers(1, 24).flatmap(lambda n: st.fixed_dictionaries({
    "storage_type": st.sampled_from(sorted(set(STORAGE_OF.values()))),
    "storage_elems": st.just(n),
    "numel": st.just(n),
    "offset": st.integers(0, n),
    "size": st.lists(st.integers(0, 4), max_size=3),
    "stride": st.lists(st.integers(0, 6), max_size=3),
    "ndim_match": st.just(True),
}))
pth_field_inputs = st.one_of(_ANY_FIELDS, _PLAUSIBLE_FIELDS)

_DTYPE_OF = {v: k for k, v in STORAGE_OF.items()}


def check_pth_fields(case: dict[str, Any]) -> None:
    _count("pth_fields")
    dtype = _DTYPE_OF.get(case["storage_type"], np.dtype(np.float32))
    storage = (np.arange(case["storage_elems"]) % 7).astype(dtype)
    size = case["size"]
    stride = (case["stride"] + [1] * len(size))[: len(size)] if case["ndim_match"] else case["stride"]
    spec = TensorSpec("t", "0", case["storage_type"], case["numel"], case["offset"], size, stride)
    path = write_pth(WORK / "fields.pth", pth_pickle([spec]), {"0": storage.tobytes()})
    loaded = _load_or_none(path)
    if loaded is None:
        return
    got = loaded["t"]
    # It loaded: it must be exactly what an in-bounds view of the storage gives.
    _count("pth_fields_loaded")
    assert case["storage_type"] in STORAGE_OF.values() and case["numel"] == case["storage_elems"]
    assert len(size) == len(stride) and all(n >= 0 for n in size) and all(s >= 0 for s in stride)
    count = int(np.prod(size, dtype=object)) if size else 1
    if count:
        assert count <= case["storage_elems"]
        want = reference_strided(storage, case["offset"], size, stride)
        np.testing.assert_array_equal(got, want)
    assert got.shape == tuple(size) and got.dtype == dtype


# ----------------------------------------------------------------------------- .pth: mutated pickles / archives

def _valid_pth_parts() -> tuple[bytes, dict[str, bytes]]:
    specs = [TensorSpec("module.a.weight", "0", "FloatStorage", 6, 0, [2, 3], [3, 1]),
             TensorSpec("b.bias", "1", "LongStorage", 3, 1, [2], [1]),
             TensorSpec("c", "0", "FloatStorage", 6, 2, [3], [1])]
    meta = (b"X\x04\x00\x00\x00metaq\x00}(X\x05\x00\x00\x00epochK\x03X\x01\x00\x00\x00v(K\x01K\x02tu"
            b"X\x01\x00\x00\x00nccollections\nOrderedDict\n)R")
    storages = {"0": np.arange(6, dtype=np.float32).tobytes(), "1": np.arange(3, dtype=np.int64).tobytes()}
    return pth_pickle(specs, extra=meta), storages


VALID_PICKLE, VALID_STORAGES = _valid_pth_parts()
_OPCODE_POOL = [b"(", b")", b"]", b"}", b"t", b"l", b"d", b"u", b"a", b"e", b"R", b"b", b"Q", b"0", b"2", b"1",
                b"\x85", b"\x86", b"\x87", b"\x88", b"\x89", b"N", b"q\x00", b"h\x00", b"h\x05", b"\x94",
                b"K\xff", b"J\xff\xff\xff\x7f", b"\x8a\x08" + b"\xff" * 8, b"X\xff\xff\xff\x7f", b"\x8e" + b"\xff" * 8,
                b"cos\nsystem\n", b"cbuiltins\nset\n", b"ctorch\nFloatStorage\n", b"\x93", b"\x81", b".", b"\x8f",
                b"\x90", b"\x91", b"G\x7f\xf0\x00\x00\x00\x00\x00\x00", b"c__builtin__\neval\n", b"i", b"o"]


@st.composite
def mutated_bytes(draw: Callable, base: bytes, pool: list[bytes] = _OPCODE_POOL) -> bytes:
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "splice", "duplicate"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[pos] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[pos:pos] = draw(st.sampled_from(pool)) if pool else bytes([draw(st.integers(0, 255))])
        elif kind == "delete":
            del data[pos:pos + draw(st.integers(1, 8))]
        elif kind == "truncate":
            del data[pos:]
        elif kind == "splice":
            data[pos:pos] = draw(st.binary(max_size=16))
        elif kind == "duplicate" and data:
            end = min(len(data), pos + draw(st.integers(1, 40)))
            data[pos:pos] = data[pos:end]
    return bytes(data)


def check_pth_pickle(data: bytes) -> None:
    _count("pth_pickle")
    path = write_pth(WORK / "pickle.pth", data, VALID_STORAGES)
    _expect_state_dict_or_error(path)


def _load_or_none(path: pathlib.Path) -> dict[str, np.ndarray] | None:
    """The state dict at `path`, or None when it fails with our one-line error naming the file."""
    with no_hang():
        try:
            return load_state_dict(path)
        except CheckpointFormatError as err:
            assert "\n" not in str(err) and str(path) in str(err), str(err)
            return None


def _expect_state_dict_or_error(path: pathlib.Path) -> None:
    sd = _load_or_none(path)
    if sd is None:
        return
    assert isinstance(sd, dict) and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in sd.items())
    _count(f"pth_{path.stem}_loaded")


_VALID_ARCHIVE: bytes | None = None


def valid_archive() -> bytes:
    global _VALID_ARCHIVE
    if _VALID_ARCHIVE is None:
        path = pth_from_arrays(WORK / "valid.pth", {"w": np.arange(12, dtype=np.float32).reshape(3, 4),
                                                     "b": np.ones(3, np.float16)})
        _VALID_ARCHIVE = path.read_bytes()
    return _VALID_ARCHIVE


def check_pth_archive(data: bytes) -> None:
    _count("pth_archive")
    path = WORK / "archive.pth"
    path.write_bytes(data)
    _expect_state_dict_or_error(path)


# ----------------------------------------------------------------------------- safetensors

_ST_DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "U64", "C64", "F8_E4M3", "", 7]


@st.composite
def safetensors_inputs(draw: Callable) -> bytes:
    entries = {}
    for i in range(draw(st.integers(0, 4))):
        spec = {"dtype": draw(st.sampled_from(_ST_DTYPES)),
                "shape": draw(st.lists(st.one_of(st.integers(-2, 5), st.sampled_from([2 ** 62, 2 ** 64])), max_size=4)),
                "data_offsets": draw(st.lists(st.one_of(st.integers(-4, 80), st.sampled_from([2 ** 63, 2 ** 70])),
                                              min_size=draw(st.integers(1, 3)), max_size=3))}
        if draw(st.booleans()):
            spec = draw(st.sampled_from([spec, {**spec, "extra": 1}, {"dtype": "F32"}, [1, 2], "x", None]))
        entries[draw(st.sampled_from(["a", "b", f"t{i}", "__metadata__", "ü"]))] = spec
    raw = json.dumps(entries).encode()
    if draw(st.booleans()):
        raw = draw(mutated_bytes(raw, [b"{", b"}", b"[", b"]", b",", b":", b'"', b"1e999", b"-0", b"\\u0000",
                                       b"99999999999999999999999"]))
    declared = draw(st.one_of(st.none(), st.integers(0, len(raw) + 100), st.sampled_from([2 ** 63, 2 ** 64 - 1])))
    return safetensors_bytes(raw, draw(st.binary(max_size=96)), declared_length=declared)


@st.composite
def plausible_safetensors(draw: Callable) -> bytes:
    """A well-formed file (random tensors tiling the data), sometimes with one field then changed."""
    from clover_jax.convert.safetensors_io import DTYPES

    entries, offset = {}, 0
    for i in range(draw(st.integers(0, 4))):
        dtype = draw(st.sampled_from(["F64", "F32", "F16", "BF16", "I64", "I8", "U8", "BOOL"]))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES[dtype]).itemsize
        entries[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    change = draw(st.sampled_from([None, "shape", "dtype", "offset", "data"]))
    if entries and change in ("shape", "dtype", "offset"):
        victim = entries[draw(st.sampled_from(sorted(entries)))]
        if change == "shape":
            victim["shape"] = draw(st.lists(st.integers(0, 4), max_size=3))
        elif change == "dtype":
            victim["dtype"] = draw(st.sampled_from(_ST_DTYPES))
        else:
            victim["data_offsets"][draw(st.integers(0, 1))] += draw(st.integers(-3, 3))
    data = draw(st.binary(min_size=offset, max_size=offset))
    if change == "data":
        data = data[: draw(st.integers(0, len(data)))] + draw(st.binary(max_size=4))
    return safetensors_bytes(entries, data)


def check_safetensors(data: bytes) -> None:
    _count("safetensors")
    path = WORK / "fuzz.safetensors"
    path.write_bytes(data)
    ours = _load_or_none(path)
    if ours is None:
        return
    # Whatever we load, the reference implementation loads identically.
    _count("safetensors_loaded")
    from safetensors.numpy import load as reference_load

    if any(v.dtype.name == "bfloat16" for v in ours.values()):
        return  # the reference's numpy loader has no bfloat16 (KeyError 'BF16'): nothing to compare with
    theirs = reference_load(data)
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape
        assert ours[k].tobytes() == theirs[k].tobytes()


# ----------------------------------------------------------------------------- annotation readers

def _readers() -> dict[str, Callable[[pathlib.Path], Any]]:
    from data_pipelines.build import caption_readers, qa_readers, qa_sources

    readers: dict[str, Callable[[pathlib.Path], Any]] = {
        name: getattr(module, name) for module in (caption_readers, qa_readers) for name in dir(module)
        if name.startswith("read_") and name != "read_tgif_qa_tsv"}
    readers["read_tgif_qa_tsv"] = lambda p: qa_readers.read_tgif_qa_tsv(p, task="frameqa")
    readers["read_tgif_qa_tsv_action"] = lambda p: qa_readers.read_tgif_qa_tsv(p, task="action")
    for source in qa_sources.QA_SOURCES:
        readers[f"read_qa_examples[{source}]"] = lambda p, s=source: qa_sources.read_qa_examples(s, p, "test")
    return readers


SAMPLES = [
    b"videoid,contentUrl,duration,page_dir,name\n1,http://x,PT00H00M10S,dir,a dog runs\n",
    b"a caption\tpath/img.jpg\n",
    b'{"video": "v1", "text": "a cat"}\n{"video": "v2", "text": ["x", "y"]}\n',
    b"key,vid_key,video_id,sentence\nret0,msr7579,video7579,a girl\n",
    b'{"sentences": [{"video_id": "video1", "caption": "x"}], "videos": [{"video_id": "video1"}]}',
    b'{"qid": 1, "clip_name": "v", "options": ["a", "b"], "answer": "0"}\n',
    b'{"question": "what?", "answer": "dog", "video_id": 3, "id": 1, "answer_type": "what"}\n',
    b'{"dog": 0, "cat": 1}',
    b'{"clip_1": ["a dog", "a cat"]}',
    b"clip_1 vid1\nclip_2 vid2\n",
    b'[{"video_id": 1, "question": "what?", "answer": "dog", "id": 0}]',
    b"dog\ncat\n",
    b'[{"video": "v.mp4", "times": [[0, 1]], "description": "x"}]',
    b"clip\t0\t1\t1\ta man sits\n",
    b"gif_name\tquestion\tanswer\tvid_id\tkey\ttype\ntumblr_x\twhat is it?\tdog\t1\t1\t0\n",
    b"gif_name\tquestion\ta1\ta2\ta3\ta4\ta5\tanswer\tvid_id\tkey\ntumblr_x\twhat?\ta\tb\tc\td\te\t0\t1\t1\n",
    b"clip\t0\t1\tq?\ta\tb\tc\td\te\t2\n",
    b'[{"video": "v", "sentence": "he _____ the door", "answer": "opens"}]',
]
_TEXT_POOL = [b",", b"\t", b"\n", b"\r", b'"', b"\x00", b"\xff", b"\xef\xbb\xbf", b"{", b"}", b"[", b"]", b":",
              b"null", b"-1", b"1e999", b"NaN", b"_____", b"\\", b"\xe2\x80\xa8", b"x" * 200, b"\t" * 12]


@st.composite
def annotation_inputs(draw: Callable) -> tuple[str, bytes]:
    readers = sorted(_readers())
    name = draw(st.sampled_from(readers))
    base = draw(st.sampled_from(SAMPLES))
    data = draw(st.one_of(mutated_bytes(base, _TEXT_POOL), st.binary(max_size=200),
                          st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass"))))
    return name, data


def check_annotations(case: tuple[str, bytes]) -> None:
    _count("annotations")
    name, data = case
    path = WORK / "annotations.txt"
    path.write_bytes(data)
    with no_hang():
        try:
            _readers()[name](path)
            _count("annotations_loaded")
        except ValueError as err:  # our readers' error type: the message says what is wrong with the file
            assert str(err), name


# ----------------------------------------------------------------------------- config overrides

def _config_keys() -> list[str]:
    from clover_jax.workdir_config import flatten_config
    from configs.pretrain import get_config

    return sorted(flatten_config(get_config("tiny").to_dict()))


_VALUES = st.one_of(st.sampled_from(["1", "0", "-1", "1e-4", "true", "False", "None", "", "()", "(1,2)", "[1]",
                                     "{}", "{'a': 1}", "'x'", "nan", "inf", "1" * 5000, "tiny", "base", "=",
                                     "a=b", "\x00", "é"]),
                    st.text(max_size=30))


@st.composite
def config_argv(draw: Callable) -> list[str]:
    keys = _config_keys()
    argv = ["train"]
    for _ in range(draw(st.integers(1, 4))):
        key = draw(st.one_of(st.sampled_from(keys), st.text(max_size=12).map(lambda s: "x." + s),
                             st.sampled_from(["model", "optim", "data.sources", "", "model.overrides.x",
                                              "data.synthetic"])))
        sep = draw(st.sampled_from(["=", "=", " ", ""]))
        argv.append(f"--config.{key}{sep}{draw(_VALUES)}")
    argv.insert(1, draw(st.sampled_from(["--config=configs/pretrain.py:tiny"] * 4 + [
        "--config=configs/pretrain.py:bad", "--config=configs/absent.py", "--config=configs/pretrain.py:tiny,base",
        "--config=configs/qa_synthetic.py:open", "--config=configs/finetune_qa.py:msvd_qa,tiny"])))
    return argv


def check_config_argv(argv: list[str]) -> None:
    """The train CLI's flag parsing: a config, or an error our one-line formatter turns into one line."""
    _count("config_argv")
    from absl import flags
    from ml_collections import config_flags

    from clover_jax.train import _one_line_flag_error
    from clover_jax.workdir_config import config_differences

    with no_hang():
        try:
            values = flags.FlagValues()  # as the CLI does: override flags are found in argv when defined
            config_flags.DEFINE_config_file("config", "configs/pretrain.py", "", flag_values=values, lock_config=True,
                                            sys_argv=argv)
            values(argv, known_only=False)
            config = values.config
        except Exception as err:  # noqa: BLE001 - absl/ml_collections raise many types; the CLI formats them all
            line = _one_line_flag_error(err, argv)
            assert line.startswith("error: ") and "\n" not in line
            return
        from configs.pretrain import get_config

        config_differences(get_config("tiny").to_dict(), config.to_dict())
        _count("config_argv_loaded")


def check_config_arg(arg: str) -> None:
    """The `file.py:arg` variant string: a config, or a ValueError naming the valid keys."""
    _count("config_arg")
    from configs.common import parse_arg

    with no_hang():
        try:
            parse_arg(arg, demo=False, tiny=False, base=False, frames=8, lr=1.0, name="x")
            _count("config_arg_loaded")
        except ValueError as err:
            assert str(err)


TARGETS = {
    "pth_fields": (pth_field_inputs, check_pth_fields),
    "pth_pickle": (mutated_bytes(VALID_PICKLE), check_pth_pickle),
    "pth_archive": (st.deferred(lambda: mutated_bytes(valid_archive(), [])), check_pth_archive),
    "safetensors": (st.one_of(safetensors_inputs(), plausible_safetensors()), check_safetensors),
    "annotations": (annotation_inputs(), check_annotations),
    "config_argv": (config_argv(), check_config_argv),
    "config_arg": (st.text(max_size=40), check_config_arg),
}
