"""The C kernels' exported functions as ctypes calls them, checked against the C sources.

ctypes trusts `argtypes`: a list out of step with its C prototype (a parameter added, dropped,
or widened from int to int64_t) passes arguments in the wrong registers or widths and corrupts
memory instead of raising. So `SIGNATURES` is the one Python statement of the prototypes,
`declare` applies it to the loaded library, and `mismatches` compares it with the prototypes
parsed from the sources: `load_cpu_kernels` runs that check before the first call, and
tests/test_kernel_signatures.py runs it on the sources and on altered copies of them.

Parameters are compared by class, which is what decides how they are passed: pointer (any
pointee, const or not), 32- or 64-bit integer (signedness aside), float, double.
No torch import: the check runs without it.
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Mapping
from typing import Any

PTR, I64, INT, F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float

# name -> (restype, argtypes), in the order of the C parameters (named in the comments).
SIGNATURES: dict[str, tuple[Any, tuple[Any, ...]]] = {
    # decode.c
    "paged_decode": (None, (PTR, PTR, PTR, I64,  # q, k_cache, v_cache, slots
                            PTR, I64, PTR,  # bt, nb, lens
                            I64, I64, I64, I64, I64,  # B, H, kvh, d, bs
                            F32, INT,  # scale, is_bf16
                            PTR, PTR, PTR, INT)),  # out, lse, work, threads
    "shared_decode_work": (I64, (I64, I64, I64, I64, I64, I64)),  # H, kvh, d, mt, pmax, omax
    "shared_decode": (None, (PTR, PTR, PTR, I64, I64,  # q, k_cache, v_cache, slots, G
                             PTR, PTR, I64, PTR,  # offs, pbt, pnb, plens
                             PTR, I64, PTR,  # obt, onb, olens
                             I64, I64, I64, I64,  # H, kvh, d, bs
                             F32, INT, I64,  # scale, is_bf16, mt
                             PTR, PTR, I64, INT)),  # out, work, wsize, threads
    "avx512_decode": (INT, ()),
    # prefill.c
    "prefill_work": (I64, (I64, I64, I64)),  # H, kvh, nmax
    "prefill_pack": (I64, (PTR, I64, I64, I64, INT)),  # nkeys, S, kvh, d, is_bf16
    "paged_prefill": (INT, (PTR, PTR, PTR, I64, I64,  # q, k_cache, v_cache, slots, S
                            PTR, I64, PTR,  # kbt, nb, nkeys
                            PTR, I64, PTR, PTR, PTR,  # cfirst, C, qrow, qlen, lim0
                            I64, I64, I64, I64, I64,  # N, H, kvh, d, bs
                            F32, INT,  # scale, is_bf16
                            PTR, PTR, PTR, PTR, I64, INT)),  # out, lse, kpack, work, wsize, threads
    # norm.c
    "rms_norm": (None, (PTR, PTR, PTR, PTR,  # x, res, weight, out
                        I64, I64, F32, INT, INT)),  # rows, n, eps, is_bf16, threads
    "silu_mul": (None, (PTR, PTR, I64, I64, INT, INT)),  # gate_up, out, rows, m, is_bf16, threads
    # argmax.c
    "argmax_rows": (None, (PTR, I64, I64, INT, PTR, PTR, INT)),  # x, rows, n, is_bf16, out, work, threads
    # bitmask.c
    "apply_token_bitmask": (None, (PTR, I64, INT, PTR, I64,  # logits, n, is_bf16, rows, nrows
                                   PTR, I64, INT)),  # mask, words, threads
}


def declare(lib: ctypes.CDLL) -> None:
    """Set `restype` and `argtypes` of every function in `SIGNATURES` on `lib`."""
    for name, (restype, argtypes) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, list(argtypes)


def ctypes_class(t: Any) -> str:
    """How a ctypes type is passed: "void" (restype None), "pointer", "int32", "int64", "float", "double"."""
    if t is None:
        return "void"
    if t in (ctypes.c_void_p, ctypes.c_char_p, ctypes.c_wchar_p) or issubclass(t, ctypes._Pointer):
        return "pointer"
    if t is ctypes.c_float:
        return "float"
    if t is ctypes.c_double:
        return "double"
    if issubclass(t, ctypes._SimpleCData) and t._type_ in "bBhHiIlLqQ":
        return f"int{8 * ctypes.sizeof(t)}"
    raise ValueError(f"no class for ctypes type {t!r}")


_C_SCALARS = {"void": "void", "float": "float", "double": "double",
              "int": f"int{8 * ctypes.sizeof(ctypes.c_int)}", "unsigned": f"int{8 * ctypes.sizeof(ctypes.c_uint)}",
              "long": f"int{8 * ctypes.sizeof(ctypes.c_long)}", "int32_t": "int32", "uint32_t": "int32",
              "int64_t": "int64", "uint64_t": "int64", "size_t": f"int{8 * ctypes.sizeof(ctypes.c_size_t)}"}
_COMMENTS = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)
# A function definition starting at the beginning of a line: return type, name, parameters, "{".
_MACRO = re.compile(r"^[ \t]*#[ \t]*define[ \t]+([A-Za-z_]\w*)[ \t]+([^\n]*)", re.M)
_DEFINITION = re.compile(r"^([A-Za-z_][\w \t*]*?)\s*\b([A-Za-z_]\w*)\s*\(([^()]*)\)\s*\{", re.M)


def c_class(decl: str) -> str:
    """The class of a C type (a parameter with or without its name, or a return type)."""
    if "*" in decl:
        return "pointer"
    words = [w for w in decl.split() if w not in ("const", "volatile", "restrict", "signed", "register")]
    for w in words:
        if w in _C_SCALARS:
            return _C_SCALARS[w]
    raise ValueError(f"no class for the C type in {decl!r}")


def object_macros(text: str) -> dict[str, str]:
    """Object-like `#define NAME replacement` macros of a C source (ALWAYS_INLINE and the like)."""
    return {m.group(1): m.group(2).strip() for m in _MACRO.finditer(_COMMENTS.sub(" ", text))}


def c_prototypes(text: str, macros: Mapping[str, str] | None = None) -> dict[str, tuple[str, list[tuple[str, str]]]]:
    """The functions a C source defines with external linkage: name -> (return class,
    [(parameter class, parameter as written)]). `static` functions are left out, also where a
    macro of `macros` (default: the source's own) supplies the `static`."""
    macros = object_macros(text) if macros is None else macros
    found: dict[str, tuple[str, list[tuple[str, str]]]] = {}
    for m in _DEFINITION.finditer(_COMMENTS.sub(" ", text)):
        ret = " ".join(macros.get(w, w) for w in m.group(1).split())
        name, params = m.group(2), " ".join(m.group(3).split())
        if "static" in ret.split() or ret.split()[0] in ("if", "for", "while", "switch", "return", "else"):
            continue
        plist = [] if params in ("", "void") else [p.strip() for p in params.split(",")]
        found[name] = (c_class(ret), [(c_class(p), p) for p in plist])
    return found


def mismatches(sources: Mapping[str, str], signatures: Mapping[str, tuple[Any, tuple[Any, ...]]] = SIGNATURES
               ) -> list[str]:
    """Every disagreement between `signatures` and the functions that `sources` (file name ->
    text) export: a function missing on either side, a return class, a parameter count, a
    parameter class. Empty when they agree."""
    macros: dict[str, str] = {}
    for text in sources.values():
        macros.update(object_macros(text))
    c: dict[str, tuple[str, str, list[tuple[str, str]]]] = {}
    for file, text in sources.items():
        for name, (ret, params) in c_prototypes(text, macros).items():
            c[name] = (file, ret, params)
    problems = [f"{name}: has a ctypes signature but no C source defines it" for name in signatures if name not in c]
    for name, (file, ret, params) in c.items():
        if name not in signatures:
            problems.append(f"{name} ({file}): exported by the C source but has no ctypes signature")
            continue
        restype, argtypes = signatures[name]
        if ctypes_class(restype) != ret:
            problems.append(f"{name} ({file}): returns {ret} in C, {ctypes_class(restype)} in ctypes")
        if len(argtypes) != len(params):
            problems.append(f"{name} ({file}): {len(params)} parameters in C, {len(argtypes)} in ctypes")
        for k, ((cls, decl), t) in enumerate(zip(params, argtypes)):
            if ctypes_class(t) != cls:
                problems.append(f"{name} ({file}): parameter {k} `{decl}` is {cls} in C, {ctypes_class(t)} in ctypes")
    return problems
