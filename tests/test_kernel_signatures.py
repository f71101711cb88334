"""The ctypes signatures of the C kernels (kernels/signatures.py) against the C sources, the
built library and the Python call sites; and that a changed prototype is caught."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from batchllm.kernels import cpu
from batchllm.kernels.signatures import F32, I64, INT, PTR, SIGNATURES, c_prototypes, mismatches

KERNELS = cpu.load_cpu_kernels()


def sources() -> dict[str, str]:
    return {f.name: f.read_text() for f in cpu.SOURCES + cpu.HEADERS}


def altered(file: str, old: str, new: str) -> dict[str, str]:
    """The sources with `old` (which must occur exactly once in `file`, however its words are
    spaced there) replaced by `new`."""
    s = sources()
    s[file], count = re.subn(r"\s+".join(map(re.escape, old.split())), lambda _: new, s[file])
    assert count == 1, old
    return s


def test_the_table_matches_every_exported_c_function() -> None:
    assert mismatches(sources()) == []  # a function missing on either side would be listed


@pytest.mark.parametrize("file,old,new,expect", [
    # int64_t -> int: same count, narrower register contents
    ("decode.c", "const int64_t *bt, int64_t nb,", "const int64_t *bt, int nb,",
     r"paged_decode .*parameter 5 `int nb` is int32 in C, int64"),
    # a parameter dropped, and one added
    ("norm.c", "int64_t m, int is_bf16, int threads)", "int64_t m, int threads)", r"silu_mul .*5 parameters in C, 6"),
    ("argmax.c", "float *work, int threads)", "float *work, int threads, int64_t extra)",
     r"argmax_rows .*8 parameters in C, 7"),
    # float -> double, pointer -> integer, integer -> pointer
    ("prefill.c", "int64_t bs, float scale, int is_bf16, void *out, float *lse, uint32_t *kpack",
     "int64_t bs, double scale, int is_bf16, void *out, float *lse, uint32_t *kpack",
     r"paged_prefill .*parameter 18 `double scale` is double in C, float"),
    ("decode.c", "void *out, float *work, int64_t wsize, int threads", "void *out, int64_t work, int64_t wsize, "
     "int threads", r"shared_decode .*parameter 20 `int64_t work` is int64 in C, pointer"),
    ("prefill.c", "int64_t prefill_pack(const int64_t *nkeys, int64_t S,", "int64_t prefill_pack(int64_t nkeys, "
     "int64_t *S,", r"prefill_pack .*parameter 0 `int64_t nkeys` is int64 in C, pointer"),
    # the return type
    ("prefill.c", "int64_t prefill_work(", "int prefill_work(", r"prefill_work .*returns int32 in C, int64"),
    # a function renamed: one side each
    ("decode.c", "int avx512_decode(void)", "int avx512_paths(void)", r"avx512_decode: has a ctypes signature but no"),
    ("decode.c", "int avx512_decode(void)", "int avx512_paths(void)",
     r"avx512_paths \(decode.c\): exported .* no ctypes"),
])
def test_a_changed_prototype_is_a_mismatch(file: str, old: str, new: str, expect: str) -> None:
    problems = mismatches(altered(file, old, new))
    assert any(re.search(expect, p) for p in problems), problems


def test_a_changed_table_is_a_mismatch() -> None:
    table = dict(SIGNATURES)
    table["rms_norm"] = (None, (PTR, PTR, PTR, PTR, I64, I64, F32, INT))  # threads forgotten
    table["argmax_rows"] = (None, (PTR, I64, I64, I64, PTR, PTR, INT))  # is_bf16 widened
    problems = mismatches(sources(), table)
    assert len(problems) == 2
    assert "rms_norm (norm.c): 9 parameters in C, 8 in ctypes" in problems[0] + problems[1]
    assert "argmax_rows (argmax.c): parameter 3 `int is_bf16` is int32 in C, int64 in ctypes" in problems


def test_the_parser_reads_c_as_written() -> None:
    text = """
#define HIDDEN static inline
/* int commented_out(int a) { */
static int helper(int a) { return a; }
HIDDEN float hidden(float x) { return x; }
int64_t
split_over_lines(const float *restrict x,   // a comment
                 const int64_t n, unsigned k, double *const y) {
    if (n > 0) {
        return 1;
    }
    return 0;
}
void no_params(void) {}
char *returns_pointer(size_t n) { return 0; }
"""
    got = c_prototypes(text)
    assert set(got) == {"split_over_lines", "no_params", "returns_pointer"}
    ret, params = got["split_over_lines"]
    assert ret == "int64" and [c for c, _ in params] == ["pointer", "int64", "int32", "pointer"]
    assert got["no_params"] == ("void", []) and got["returns_pointer"][0] == "pointer"
    with pytest.raises(ValueError, match="no class"):
        c_prototypes("struct pair make(struct pair p) { return p; }")


def test_load_refuses_a_table_out_of_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if KERNELS is None:
        pytest.skip("no C compiler")
    monkeypatch.setitem(SIGNATURES, "silu_mul", (None, (PTR, PTR, I64, I64, INT)))
    with pytest.raises(RuntimeError, match="silu_mul .*6 parameters in C, 5 in ctypes"):
        cpu.load_cpu_kernels.__wrapped__(tmp_path)
    assert list(tmp_path.iterdir()) == []  # refused before building


@pytest.mark.skipif(KERNELS is None, reason="no C compiler")
def test_the_loaded_library_carries_the_table() -> None:
    assert KERNELS is not None
    for name, (restype, argtypes) in SIGNATURES.items():
        fn = getattr(KERNELS.lib, name)
        assert fn.restype == restype and fn.argtypes == list(argtypes), name


@pytest.mark.skipif(KERNELS is None or shutil.which("nm") is None, reason="no C compiler or no nm")
def test_the_library_exports_exactly_the_table() -> None:
    assert KERNELS is not None
    out = subprocess.run(["nm", "-D", "--defined-only", str(KERNELS.path)], capture_output=True, text=True,
                         check=True).stdout
    functions = {parts[2] for parts in map(str.split, out.splitlines())
                 if len(parts) == 3 and parts[1] == "T" and not parts[2].startswith("_")}
    assert functions == set(SIGNATURES)


def test_python_call_sites_pass_every_parameter() -> None:
    """ctypes rejects too few arguments but passes surplus ones on: count them at each call."""
    tree = ast.parse(Path(cpu.__file__).read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and isinstance(n.func.value, ast.Attribute) and n.func.value.attr == "lib"]
    assert {c.func.attr for c in calls} == set(SIGNATURES)  # every function is called somewhere
    for c in calls:
        assert not c.keywords and not any(isinstance(a, ast.Starred) for a in c.args)
        assert len(c.args) == len(SIGNATURES[c.func.attr][1]), f"{c.func.attr} at cpu.py:{c.lineno}"

