"""The ctypes layer mirrors include/kfac.h one to one; library discovery and version check."""

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


def _header_functions():
    """{name: (return type, [parameter types])} of every function declared in kfac.h."""
    code = _header_code()
    functions = {}
    for match in re.finditer(r"([A-Za-z_][\w\s\*]*?)\b(kfac_\w+)\s*\(([^()]*)\)\s*;", code):
        ret, name, params = match.groups()
        ret = " ".join(ret.split())
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
    "int64_t*": ctypes.POINTER(ctypes.c_int64),
    "size_t*": ctypes.POINTER(ctypes.c_size_t),
    "kfac_layer_info*": ctypes.POINTER(_lib.kfac_layer_info),
    "const kfac_conv2d_desc*": ctypes.POINTER(_lib.kfac_conv2d_desc),
    "float*const*": ctypes.POINTER(ctypes.POINTER(ctypes.c_float)),
    "double*const*": ctypes.POINTER(ctypes.POINTER(ctypes.c_double)),
    "const float*const*": ctypes.POINTER(ctypes.POINTER(ctypes.c_float)),
    "const double*const*": ctypes.POINTER(ctypes.POINTER(ctypes.c_double)),
}


@needs_header
def test_every_header_function_is_bound_with_matching_types():
    functions = _header_functions()
    assert len(functions) >= 30
    assert set(functions) == set(_lib.FUNCTION_NAMES)
    for name, (ret, params) in functions.items():
        bound = getattr(_lib, name)
        assert ret in _C_TYPES, (name, ret)
        assert bound.restype is _C_TYPES[ret], name
        assert [_C_TYPES[p] for p in params] == list(bound.argtypes), name


@needs_header
def test_every_header_constant_is_mirrored_with_its_value():
    code = _header_code()
    enum_values = dict(
        (name, int(value)) for name, value in re.findall(r"\b(KFAC_\w+)\s*=\s*(-?\d+)", code)
    )
    macros = dict(re.findall(r"#define\s+(KFAC_VERSION_(?:MAJOR|MINOR|PATCH))\s+(\d+)", code))
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
    assert _lib.KFAC_VERSION_NUMBER == expected_number == 100
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
        match = re.fullmatch(r"(\w+)\s+(\w+(?:\s*,\s*\w+)*)", declaration)
        assert match, (name, declaration)
        ctype, names = match.groups()
        fields.extend((ctype, field.strip()) for field in names.split(","))
    return fields


_STRUCT_CTYPES = {"size_t": ctypes.c_size_t, "int32_t": ctypes.c_int32, "int64_t": ctypes.c_int64}


@needs_header
@pytest.mark.parametrize("name, size", [("kfac_layer_info", 64), ("kfac_conv2d_desc", 144)])
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
    for name in ("kfac_layer_info", "kfac_conv2d_desc"):
        struct = getattr(_lib, name)
        lines.append(f'printf("%zu\\n", sizeof({name}));')
        expected.append(ctypes.sizeof(struct))
        for field, _ in struct._fields_:
            lines.append(f'printf("%zu\\n", offsetof({name}, {field}));')
            expected.append(getattr(struct, field).offset)
    source = tmp_path / "layout.c"
    source.write_text(
        "#include <stddef.h>\n#include <stdio.h>\n#include <kfac.h>\nint main(void) {\n"
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
    assert isinstance(_lib.kfac_last_error(None), bytes)


def test_raw_calls_report_statuses():
    """The raw layer returns statuses; it raises nothing itself."""
    handle = _lib.kfac_optimizer_p()
    assert _lib.kfac_optimizer_create(99, ctypes.byref(handle)) == kfac.KFAC_ERROR_INVALID_ARGUMENT
    assert not handle
    assert _lib.kfac_optimizer_create(kfac.KFAC_FLOAT64, None) == kfac.KFAC_ERROR_NULL_POINTER
    assert _lib.kfac_optimizer_create(kfac.KFAC_FLOAT64, ctypes.byref(handle)) == kfac.KFAC_OK
    try:
        assert _lib.kfac_dtype_of(handle) == kfac.KFAC_FLOAT64
        assert _lib.kfac_layer_count(handle) == 0
        assert _lib.kfac_step_count(handle) == 0
        assert _lib.kfac_last_error(handle) == b""
        assert _lib.kfac_dtype_of(None) == kfac.KFAC_ERROR_NULL_POINTER
        assert _lib.kfac_layer_count(None) == kfac.KFAC_ERROR_NULL_POINTER
        assert _lib.kfac_wants_statistics(None) == kfac.KFAC_ERROR_NULL_POINTER
        assert np.isnan(_lib.kfac_last_kl_scale(None))
        assert np.isnan(_lib.kfac_last_kl_scale(handle))
        info = _lib.kfac_layer_info.new()
        layer = ctypes.c_int32(-1)
        assert _lib.kfac_add_dense(handle, 3, 2, 1, ctypes.byref(layer)) == kfac.KFAC_OK
        assert layer.value == 0
        assert _lib.kfac_layer_get_info(handle, 0, ctypes.byref(info)) == kfac.KFAC_OK
        assert (info.kind, info.has_bias, info.in_features, info.out_features) == (
            kfac.KFAC_LAYER_DENSE, 1, 3, 2)
        assert (info.a_dim, info.g_dim, info.has_factors, info.has_inverses) == (4, 2, 0, 0)
        small = _lib.kfac_layer_info()
        small.struct_size = 4
        assert _lib.kfac_layer_get_info(handle, 0, ctypes.byref(small)) == kfac.KFAC_ERROR_INVALID_SIZE
        assert _lib.kfac_add_dense(handle, 3, 2, 2, ctypes.byref(layer)) == kfac.KFAC_ERROR_INVALID_ARGUMENT
        x = np.ones((2, 3), dtype=np.float32)
        status = _lib.kfac_record_inputs_f32(
            handle, 0, x.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), 2)
        assert status == kfac.KFAC_ERROR_DTYPE_MISMATCH
        assert _lib.kfac_last_error(handle) != b""
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
