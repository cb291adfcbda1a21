"""The ctypes layer mirrors include/kfac.h one to one (KFAC_API declarations, the experimental
section, enums, structs); library discovery and version check."""

import ctypes
import os
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import libkfac as kfac
from libkfac import _lib
from testutil import REPO_ROOT

HEADER = os.path.join(REPO_ROOT, "include", "kfac.h") if REPO_ROOT else None
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(kfac.__file__)))

needs_header = pytest.mark.skipif(HEADER is None or not os.path.isfile(HEADER), reason="no kfac.h")


def _header_code():
    """kfac.h without comments."""
    with open(HEADER, encoding="utf-8") as file:
        text = file.read()
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


def _experimental_spans(code):
    """(start, end) offsets of the ``#if defined(KFAC_EXPERIMENTAL_API)`` blocks."""
    spans = []
    for match in re.finditer(r"#\s*if\s+defined\s*\(\s*KFAC_EXPERIMENTAL_API\s*\)", code):
        end = code.index("#endif", match.end())
        assert "#if" not in code[match.end():end], "nested conditionals in the experimental section"
        spans.append((match.start(), end))
    return spans


def _header_declarations():
    """[(name, has KFAC_API, experimental)] of every function declaration in kfac.h."""
    code = _header_code()
    spans = _experimental_spans(code)
    result = []
    for match in re.finditer(r"(?:^|;|\}|\n)\s*((?:KFAC_API\s+)?)[A-Za-z_][\w\s\*]*?\b(kfac_\w+)\s*\([^()]*\)\s*;", code):
        experimental = any(start <= match.start(2) < end for start, end in spans)
        result.append((match.group(2), bool(match.group(1)), experimental))
    return result


def _header_functions():
    """{name: (return type, [parameter types])} of every function declared in kfac.h (the
    experimental section's too), ``KFAC_API`` stripped."""
    code = _header_code()
    functions = {}
    for match in re.finditer(r"([A-Za-z_][\w\s\*]*?)\b(kfac_\w+)\s*\(([^()]*)\)\s*;", code):
        ret, name, params = match.groups()
        ret = " ".join(ret.replace("KFAC_API", " ").split())
        types = []
        params = params.strip()
        if params and params != "void":
            for param in params.split(","):
                param = " ".join(param.replace("*", " * ").split())
                # drop the parameter name (the last identifier)
                param = re.sub(r"\s*\b\w+$", "", param)
                types.append(param.replace(" *", "*").replace("* ", "*"))
        functions[name] = (ret.replace(" *", "*").replace("* ", "*"), types)
    return functions


# C type spelling (normalised: no spaces around '*') -> ctypes type.
_C_TYPES = {
    "void": None,
    "int": ctypes.c_int,
    "unsigned": ctypes.c_uint,
    "double": ctypes.c_double,
    "size_t": ctypes.c_size_t,
    "int32_t": ctypes.c_int32,
    "int64_t": ctypes.c_int64,
    "uint64_t": ctypes.c_uint64,
    "const char*": ctypes.c_char_p,
    "void*": ctypes.c_void_p,
    "const void*": ctypes.c_void_p,
    "kfac_optimizer*": _lib.kfac_optimizer_p,
    "const kfac_optimizer*": _lib.kfac_optimizer_p,
    "kfac_optimizer**": ctypes.POINTER(_lib.kfac_optimizer_p),
    "double*": ctypes.POINTER(ctypes.c_double),
    "const double*": ctypes.POINTER(ctypes.c_double),
    "float*": ctypes.POINTER(ctypes.c_float),
    "const float*": ctypes.POINTER(ctypes.c_float),
    "int32_t*": ctypes.POINTER(ctypes.c_int32),
    "const int32_t*": ctypes.POINTER(ctypes.c_int32),
    "int64_t*": ctypes.POINTER(ctypes.c_int64),
    "size_t*": ctypes.POINTER(ctypes.c_size_t),
    "kfac_layer_info*": ctypes.POINTER(_lib.kfac_layer_info),
    "kfac_param_info*": ctypes.POINTER(_lib.kfac_param_info),
    "const kfac_dense_desc*": ctypes.POINTER(_lib.kfac_dense_desc),
    "const kfac_conv2d_desc*": ctypes.POINTER(_lib.kfac_conv2d_desc),
    "float*const*": ctypes.POINTER(ctypes.POINTER(ctypes.c_float)),
    "double*const*": ctypes.POINTER(ctypes.POINTER(ctypes.c_double)),
    "const float*const*": ctypes.POINTER(ctypes.POINTER(ctypes.c_float)),
    "const double*const*": ctypes.POINTER(ctypes.POINTER(ctypes.c_double)),
    # conjugate gradient (experimental)
    "const kfac_cg_desc*": ctypes.POINTER(_lib.kfac_cg_desc),
    "const kfac_collectives*": ctypes.POINTER(_lib.kfac_collectives),
    "kfac_cg_result*": ctypes.POINTER(_lib.kfac_cg_result),
    "kfac_cg_product_fn_f32": _lib.kfac_cg_product_fn_f32,
    "kfac_cg_product_fn_f64": _lib.kfac_cg_product_fn_f64,
}


@needs_header
def test_every_header_function_is_bound_with_matching_types():
    functions = _header_functions()
    assert len(functions) >= 30
    assert set(functions) == set(_lib.FUNCTION_NAMES)
    # Only experimental functions may be missing from the library (declared before exported).
    assert _lib.MISSING_EXPERIMENTAL <= set(_lib.EXPERIMENTAL_FUNCTION_NAMES)
    prototypes = {name: (restype, argtypes) for name, restype, argtypes in _lib._PROTOTYPES}
    for name, (ret, params) in functions.items():
        assert ret in _C_TYPES, (name, ret)
        restype, argtypes = prototypes[name]
        assert restype is _C_TYPES[ret], name
        assert [_C_TYPES[p] for p in params] == list(argtypes), name
        bound = getattr(_lib, name)
        if name in _lib.MISSING_EXPERIMENTAL:
            assert bound is None
        else:
            assert bound.restype is _C_TYPES[ret], name
            assert [_C_TYPES[p] for p in params] == list(bound.argtypes), name


@needs_header
def test_every_declaration_has_kfac_api_and_the_experimental_section_is_mirrored():
    declarations = _header_declarations()
    assert {name for name, _, _ in declarations} == set(_header_functions())
    assert [name for name, api, _ in declarations if not api] == []
    experimental = {name for name, _, exp in declarations if exp}
    assert experimental == set(_lib.EXPERIMENTAL_FUNCTION_NAMES)
    assert {"kfac_candidates_get_count", "kfac_curvature_multiply_f64"} <= experimental
    # The experimental section is the header's last: _lib lists it last too.
    order = [name for name, _, _ in declarations]
    assert list(_lib.FUNCTION_NAMES) == order


def test_every_exported_function_is_declared():
    """The library exports nothing the header does not declare (nm -D, when available)."""
    if shutil.which("nm") is None:
        pytest.skip("needs nm")
    output = subprocess.run(["nm", "-D", "--defined-only", _lib.library_path], capture_output=True,
                            text=True).stdout
    exported = set(re.findall(r"\b(kfac_\w+)\b", output))
    assert exported, output
    assert exported <= set(_lib.FUNCTION_NAMES)
    assert set(_lib.FUNCTION_NAMES) - exported == _lib.MISSING_EXPERIMENTAL


@needs_header
def test_every_header_constant_is_mirrored_with_its_value():
    code = _header_code()
    enum_values = dict(
        (name, int(value)) for name, value in re.findall(r"\b(KFAC_\w+)\s*=\s*(-?\d+)", code)
    )
    macros = dict(re.findall(r"#define\s+(KFAC_VERSION_(?:MAJOR|MINOR|PATCH))\s+(\d+)", code))
    with open(HEADER, encoding="utf-8") as file:  # the string macro is inside quotes: raw text
        string = re.search(r'#define\s+KFAC_VERSION_STRING\s+"([^"]+)"', file.read()).group(1)
    assert _lib.KFAC_VERSION_STRING == kfac.__version__ == string == "%s.%s.%s" % (
        macros["KFAC_VERSION_MAJOR"], macros["KFAC_VERSION_MINOR"], macros["KFAC_VERSION_PATCH"])
    assert len(enum_values) >= 40
    for name, value in enum_values.items():
        assert getattr(_lib, name) == value, name
        assert getattr(kfac, name) == value, name
    for name, value in macros.items():
        assert getattr(_lib, name) == int(value), name
    expected_number = (
        int(macros["KFAC_VERSION_MAJOR"]) * 10000
        + int(macros["KFAC_VERSION_MINOR"]) * 100
        + int(macros["KFAC_VERSION_PATCH"])
    )
    assert _lib.KFAC_VERSION_NUMBER == expected_number == 200
    # No constant the header does not have.
    mirrored = {n for n in dir(_lib) if n.startswith("KFAC_") and not n.startswith("KFAC_VERSION")}
    assert mirrored == set(enum_values)


def _header_struct_fields(name):
    """[(C type, field name)] of ``typedef struct name {...} name;`` in kfac.h, declarations
    with several names (``int64_t kernel_h, kernel_w;``) expanded in order."""
    code = _header_code()
    body = re.search(r"typedef struct %s\s*\{(.*?)\}\s*%s;" % (name, name), code, re.S)
    assert body, name
    fields = []
    for declaration in body.group(1).split(";"):
        declaration = declaration.strip()
        if not declaration:
            continue
        match = re.fullmatch(r"((?:const\s+)?\w+(?:\s*\*)?)\s*(\w+(?:\s*,\s*\w+)*)", declaration)
        assert match, (name, declaration)
        ctype, names = match.groups()
        ctype = " ".join(ctype.replace("*", " *").split()).replace(" *", "*")
        fields.extend((ctype, field.strip()) for field in names.split(","))
    return fields


_STRUCT_CTYPES = {"size_t": ctypes.c_size_t, "int32_t": ctypes.c_int32, "int64_t": ctypes.c_int64,
                  "double": ctypes.c_double, "const char*": ctypes.c_char_p}
_STRUCTS = [("kfac_param_info", 64), ("kfac_dense_desc", 48), ("kfac_conv2d_desc", 144),
            ("kfac_layer_info", 64), ("kfac_cg_desc", 56), ("kfac_cg_result", 88)]


@needs_header
@pytest.mark.parametrize("name, size", _STRUCTS)
def test_structs_match_header(name, size):
    fields = _header_struct_fields(name)
    struct = getattr(_lib, name)
    assert [(field, _STRUCT_CTYPES[ctype]) for ctype, field in fields] == list(struct._fields_)
    value = struct.new()
    assert value.struct_size == ctypes.sizeof(struct) == size


@needs_header
@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_struct_layouts_match_the_c_compiler(tmp_path):
    """sizeof and every offsetof of the ctypes structs equal the C compiler's for kfac.h."""
    lines = []
    expected = []
    for name, _ in _STRUCTS:
        struct = getattr(_lib, name)
        lines.append(f'printf("%zu\\n", sizeof({name}));')
        expected.append(ctypes.sizeof(struct))
        for field, _ in struct._fields_:
            lines.append(f'printf("%zu\\n", offsetof({name}, {field}));')
            expected.append(getattr(struct, field).offset)
    source = tmp_path / "layout.c"
    source.write_text(
        "#define KFAC_EXPERIMENTAL_API\n#include <stddef.h>\n#include <stdio.h>\n#include <kfac.h>\nint main(void) {\n"
        + "\n".join(lines) + "\nreturn 0;\n}\n"
    )
    binary = tmp_path / "layout"
    subprocess.run(["cc", "-std=c11", "-I", os.path.dirname(HEADER), "-o", str(binary), str(source)],
                   check=True)
    output = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    assert [int(line) for line in output.split()] == expected


def test_loaded_version_matches_bindings():
    assert _lib.kfac_version_number() == kfac.loaded_version_number
    assert kfac.loaded_version_number // 10000 == kfac.KFAC_VERSION_MAJOR
    assert _lib.abi_compatible(kfac.loaded_version_number)
    assert kfac.library_version == "%d.%d.%d" % (
        kfac.loaded_version_number // 10000,
        kfac.loaded_version_number // 100 % 100,
        kfac.loaded_version_number % 100,
    )


def test_status_strings_and_names():
    for value, name in _lib.STATUS_NAMES.items():
        assert kfac.status_name(value) == name
        assert getattr(kfac, name) == value
        assert isinstance(kfac.status_string(value), str) and kfac.status_string(value)
    assert kfac.status_string(-12345)  # unknown codes too: never NULL
    assert kfac.status_name(-12345) == "KFAC_STATUS_-12345"
    assert kfac.status_name(kfac.KFAC_OK) == "KFAC_OK"


def test_last_error_of_null_handle_is_a_static_message():
    assert isinstance(_lib.kfac_optimizer_last_error(None), bytes)


def test_raw_calls_report_statuses():
    """The raw layer returns statuses; it raises nothing itself."""
    handle = _lib.kfac_optimizer_p()
    assert _lib.kfac_optimizer_create(99, ctypes.byref(handle)) == kfac.KFAC_ERROR_INVALID_ARGUMENT
    assert not handle
    assert _lib.kfac_optimizer_create(kfac.KFAC_FLOAT64, None) == kfac.KFAC_ERROR_NULL_POINTER
    assert _lib.kfac_optimizer_create(kfac.KFAC_FLOAT64, ctypes.byref(handle)) == kfac.KFAC_OK
    try:
        dtype, count, wanted = ctypes.c_int32(-1), ctypes.c_int32(-1), ctypes.c_int32(-1)
        steps, scale = ctypes.c_int64(-1), ctypes.c_double(7.0)
        assert _lib.kfac_optimizer_get_dtype(handle, ctypes.byref(dtype)) == kfac.KFAC_OK
        assert dtype.value == kfac.KFAC_FLOAT64
        assert _lib.kfac_layer_count(handle, ctypes.byref(count)) == kfac.KFAC_OK and count.value == 0
        assert _lib.kfac_optimizer_get_step_count(handle, ctypes.byref(steps)) == kfac.KFAC_OK
        assert steps.value == 0
        assert _lib.kfac_optimizer_last_error(handle) == b""
        assert _lib.kfac_optimizer_get_dtype(None, ctypes.byref(dtype)) == kfac.KFAC_ERROR_NULL_POINTER
        assert _lib.kfac_optimizer_get_dtype(handle, None) == kfac.KFAC_ERROR_NULL_POINTER
        assert _lib.kfac_layer_count(None, ctypes.byref(count)) == kfac.KFAC_ERROR_NULL_POINTER
        assert _lib.kfac_optimizer_wants_statistics(None, ctypes.byref(wanted)) == kfac.KFAC_ERROR_NULL_POINTER
        # No NaN sentinel: before the first step the getter fails and leaves its output alone.
        assert _lib.kfac_optimizer_get_kl_scale(None, ctypes.byref(scale)) == kfac.KFAC_ERROR_NULL_POINTER
        assert _lib.kfac_optimizer_get_kl_scale(handle, ctypes.byref(scale)) == kfac.KFAC_ERROR_NO_STEP
        assert scale.value == 7.0
        info = _lib.kfac_layer_info.new()
        layer = ctypes.c_int32(-1)
        desc = _lib.kfac_dense_desc.new(in_features=3, out_features=2, has_bias=1)
        assert _lib.kfac_layer_add_dense(handle, ctypes.byref(desc), ctypes.byref(layer)) == kfac.KFAC_OK
        assert layer.value == 0
        assert _lib.kfac_layer_get_info(handle, 0, ctypes.byref(info)) == kfac.KFAC_OK
        assert (info.kind, info.has_bias, info.in_features, info.out_features) == (
            kfac.KFAC_LAYER_DENSE, 1, 3, 2)
        assert (info.a_dim, info.g_dim, info.has_factors, info.has_inverses) == (4, 2, 0, 0)
        small = _lib.kfac_layer_info()
        small.struct_size = 4
        assert _lib.kfac_layer_get_info(handle, 0, ctypes.byref(small)) == kfac.KFAC_ERROR_INVALID_SIZE
        desc.has_bias = 2
        assert _lib.kfac_layer_add_dense(handle, ctypes.byref(desc), ctypes.byref(layer)) == kfac.KFAC_ERROR_INVALID_ARGUMENT
        x = np.ones((2, 3), dtype=np.float32)
        status = _lib.kfac_layer_record_inputs_f32(
            handle, 0, x.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), 2)
        assert status == kfac.KFAC_ERROR_DTYPE_MISMATCH
        assert _lib.kfac_optimizer_last_error(handle) != b""
    finally:
        _lib.kfac_optimizer_free(handle)
    _lib.kfac_optimizer_free(None)  # accepted and ignored


# ---------------------------------------------------------------------------------------------
# Discovery and version check, in subprocesses (the library is loaded at import)
# ---------------------------------------------------------------------------------------------


def _import_kfac(env_updates):
    env = dict(os.environ)
    env.update(env_updates)
    env["PYTHONPATH"] = PACKAGE_PARENT + os.pathsep + env.get("PYTHONPATH", "")
    code = "import libkfac, sys; sys.stdout.write(libkfac.library_path)"
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )


def test_kfac_library_env_var_is_used():
    result = _import_kfac({"KFAC_LIBRARY": _lib.library_path})
    assert result.returncode == 0, result.stderr
    assert result.stdout == _lib.library_path


def test_missing_library_gives_clear_import_error(tmp_path):
    missing = str(tmp_path / "nowhere" / "libkfac.so")
    result = _import_kfac({"KFAC_LIBRARY": missing})
    assert result.returncode != 0
    assert "ImportError" in result.stderr
    assert "KFAC_LIBRARY" in result.stderr and missing in result.stderr


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_missing_system_library_is_named_at_import(tmp_path):
    """A libkfac.so whose dependency the loader cannot find: the message names that library."""
    (tmp_path / "dep.c").write_text("int kfac_test_dependency(void) { return 1; }\n")
    (tmp_path / "fake.c").write_text(textwrap.dedent("""
        int kfac_test_dependency(void);
        unsigned kfac_version_number(void) { return (unsigned)kfac_test_dependency(); }
    """))
    dependency = tmp_path / "libkfac_vanished.so.7"
    subprocess.run(["cc", "-shared", "-fPIC", "-Wl,-soname,libkfac_vanished.so.7", "-o", str(dependency),
                    str(tmp_path / "dep.c")], check=True)
    library = tmp_path / "libkfac.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(library), str(tmp_path / "fake.c"), str(dependency)],
                   check=True)
    dependency.unlink()
    result = _import_kfac({"KFAC_LIBRARY": str(library)})
    assert result.returncode != 0
    assert "the system library libkfac_vanished.so.7 is missing" in result.stderr


@pytest.mark.parametrize("message, expected", [
    ("libopenblas.so.0: cannot open shared object file: No such file or directory", "OpenBLAS"),
    ("liblapacke.so.3: cannot open shared object file: No such file or directory", "LAPACKE"),
    ("libstdc++.so.6: cannot open shared object file: No such file or directory", "libstdc++"),
    ("/lib/x86_64-linux-gnu/libc.so.6: version `GLIBC_2.38' not found", "GLIBC_2.38"),
])
def test_missing_dependency_messages(message, expected):
    reason = _lib._missing_dependency(OSError(message))
    assert reason is not None and expected in reason
    assert _lib._missing_dependency(OSError("libkfac.so: cannot open shared object file")) is None


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_major_version_mismatch_raises_import_error(tmp_path):
    source = tmp_path / "fake.c"
    source.write_text(textwrap.dedent("""
        unsigned kfac_version_number(void) { return 10203; }
        const char *kfac_version_string(void) { return "1.2.3"; }
    """))
    library = tmp_path / "libkfac.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    result = _import_kfac({"KFAC_LIBRARY": str(library)})
    assert result.returncode != 0
    assert "ImportError" in result.stderr
    assert "1.2.3" in result.stderr and "major" in result.stderr


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_minor_version_mismatch_before_1_0_raises_import_error(tmp_path):
    """While the major version is 0 every minor release has its own ABI: a 0.1 library must not
    load under 0.2 bindings (its functions have other names and conventions)."""
    source = tmp_path / "fake.c"
    source.write_text(textwrap.dedent("""
        unsigned kfac_version_number(void) { return 100; }
        const char *kfac_version_string(void) { return "0.1.0"; }
    """))
    library = tmp_path / "libkfac.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    result = _import_kfac({"KFAC_LIBRARY": str(library)})
    assert result.returncode != 0
    assert "ImportError" in result.stderr
    assert "0.1.0" in result.stderr and "minor" in result.stderr


def test_abi_compatibility_rule():
    assert _lib.abi_compatible(_lib.KFAC_VERSION_NUMBER)
    assert _lib.abi_compatible(_lib.KFAC_VERSION_NUMBER + 1)  # a patch release
    assert not _lib.abi_compatible(_lib.KFAC_VERSION_NUMBER + 100)  # 0.(x+1)
    assert not _lib.abi_compatible(_lib.KFAC_VERSION_NUMBER - 100)  # 0.(x−1)
    assert not _lib.abi_compatible(10000 + _lib.KFAC_VERSION_NUMBER)  # another major version


def test_library_next_to_package_is_found_first(tmp_path):
    """A copy of the package with libkfac.so inside it loads that copy (KFAC_LIBRARY unset)."""
    package = tmp_path / "libkfac"
    shutil.copytree(os.path.dirname(kfac.__file__), package,
                    ignore=shutil.ignore_patterns("__pycache__", "*.so*"))
    shutil.copy(_lib.library_path, package / "libkfac.so")
    env = {key: value for key, value in os.environ.items() if key != "KFAC_LIBRARY"}
    env["PYTHONPATH"] = str(tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", "import libkfac, sys; sys.stdout.write(libkfac.library_path)"],
        env=env, capture_output=True, text=True, timeout=120, cwd=str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == str(package / "libkfac.so")
