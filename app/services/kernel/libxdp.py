"""libxdp neighbours: name the programs that share an interface through libxdp's multi-program dispatcher
(xdp-tools: xdp-filter, xdp-loader, ...) in the refusal of a foreign program (:func:`neighbour_text`), and
find out whether that dispatcher can run here at all (:func:`dispatcher_support`). portwatch attaches its
own program plainly: BCC loads it as an XDP program, not as an extension (:func:`attach_text`).

ctypes to Debian's libbpf1 and libxdp1; without libxdp1 everything says so and nothing fails.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
from functools import lru_cache
from pathlib import Path

from app.services.kernel import maps

log = logging.getLogger(__name__)

DISPATCHER_NAME = "xdp_dispatcher"         # the program name of libxdp's dispatcher (xdp-dispatcher.o)
DISPATCHER_OBJECT = "xdp-dispatcher.o"
# where libxdp looks for its BPF objects (LIBXDP_OBJECT_PATH first, then its build-time BPF_OBJECT_DIR)
OBJECT_DIRS = ("/usr/lib/x86_64-linux-gnu/bpf", "/usr/lib/aarch64-linux-gnu/bpf", "/usr/lib/bpf",
               "/usr/local/lib/bpf")
RUN_CONFIG_SECTION = b".xdp_run_config"    # the BTF data section libxdp reads run priority and chain actions from
_BPF_PROG_TYPE_EXT = 28                    # enum bpf_prog_type (uapi/linux/bpf.h)
_BTF_KIND_DATASEC = 15


@lru_cache(maxsize=1)
def libxdp() -> ctypes.CDLL | None:
    """Debian's libxdp1 (libxdp.so.1) with the few functions used here declared, or None when absent."""
    try:
        lib = ctypes.CDLL("libxdp.so.1", use_errno=True)
    except OSError:
        return None
    vp = ctypes.c_void_p
    lib.libxdp_set_print.restype, lib.libxdp_set_print.argtypes = vp, [vp]
    lib.libxdp_set_print(None)                    # its warnings would land on the user's terminal
    lib.xdp_program__from_id.restype, lib.xdp_program__from_id.argtypes = vp, [ctypes.c_uint32]
    lib.libxdp_get_error.restype, lib.libxdp_get_error.argtypes = ctypes.c_long, [vp]
    lib.xdp_program__btf.restype, lib.xdp_program__btf.argtypes = vp, [vp]
    lib.xdp_program__run_prio.restype, lib.xdp_program__run_prio.argtypes = ctypes.c_uint, [vp]
    lib.xdp_program__close.restype, lib.xdp_program__close.argtypes = None, [vp]
    return lib


def dispatcher_object() -> Path | None:
    """libxdp's xdp-dispatcher.o (installed with libxdp1), or None."""
    dirs = [os.environ["LIBXDP_OBJECT_PATH"]] if os.environ.get("LIBXDP_OBJECT_PATH") else []
    for directory in (*dirs, *OBJECT_DIRS):
        if (Path(directory) / DISPATCHER_OBJECT).is_file():
            return Path(directory) / DISPATCHER_OBJECT
    return None


@lru_cache(maxsize=1)
def dispatcher_support() -> tuple[bool, str]:
    """(usable, one sentence): can libxdp's dispatcher chain XDP programs on this host? Needs root.

    libxdp chains several XDP programs on one interface: a small ``xdp_dispatcher`` program is attached,
    and each program replaces one of its stub functions as a program extension (BPF_PROG_TYPE_EXT,
    "freplace"), called in run-priority order. A kernel that refuses program extensions (an LSM that
    denies tracing-class programs, a kernel without BTF) cannot run the dispatcher; libxdp then attaches
    the single program plainly ("legacy" mode), as xdp-filter does there. The check is the one libxdp
    makes before it builds a dispatcher (:func:`_probe_extension`), without touching any interface."""
    if libxdp() is None:
        return False, "libxdp is not installed (Debian libxdp1)"
    obj = dispatcher_object()
    if obj is None:
        return False, f"libxdp's {DISPATCHER_OBJECT} is missing (Debian libxdp1)"
    try:
        failure = _probe_extension(obj)
    except Exception as exc:       # a libbpf without one of these functions: the load goes on, plainly
        failure = f"the probe failed ({exc})"
    if failure:
        return False, f"this kernel refuses the program extensions (freplace) it is made of: {failure}"
    return True, "this kernel runs libxdp's dispatcher"


def _probe_extension(obj: Path) -> str | None:
    """Load libxdp's ``xdp_pass`` as XDP, then as an extension of itself, and attach that; None when all
    worked, else the error (what libxdp's own compatibility check does before it builds a dispatcher)."""
    lib = _libbpf()
    old_print = lib.libbpf_set_print(None)        # a refused load prints the verifier's complaint otherwise
    target = extension = None
    try:
        target = _open_one(lib, obj, b"xdp_pass")
        if lib.bpf_object__load(target) < 0:
            return f"cannot load {obj.name} ({os.strerror(ctypes.get_errno() or errno.EINVAL)})"
        target_fd = lib.bpf_program__fd(lib.bpf_object__find_program_by_name(target, b"xdp_pass"))
        extension = _open_one(lib, obj, b"xdp_pass")
        prog = lib.bpf_object__find_program_by_name(extension, b"xdp_pass")
        lib.bpf_program__set_type(prog, _BPF_PROG_TYPE_EXT)
        lib.bpf_program__set_expected_attach_type(prog, 0)
        if lib.bpf_program__set_attach_target(prog, target_fd, b"xdp_pass") < 0:
            return "its attach target has no BTF"
        rc = lib.bpf_object__load(extension)
        if rc < 0:
            return os.strerror(-rc if rc < -1 else ctypes.get_errno())
        link = lib.bpf_raw_tracepoint_open(None, lib.bpf_program__fd(prog))
        if link < 0:
            return os.strerror(-link if link < -1 else ctypes.get_errno())
        os.close(link)
        return None
    except OSError as exc:
        return str(exc)
    finally:
        for handle in (extension, target):
            if handle:
                lib.bpf_object__close(handle)
        lib.libbpf_set_print(old_print)


def _open_one(lib, obj: Path, name: bytes):
    """bpf_object of ``obj`` with only program ``name`` loadable (OSError when it cannot be opened)."""
    handle = lib.bpf_object__open_file(str(obj).encode(), None)
    if not handle:
        raise OSError(f"cannot open {obj} ({os.strerror(ctypes.get_errno())})")
    prog = lib.bpf_object__next_program(handle, None)
    while prog:
        lib.bpf_program__set_autoload(prog, lib.bpf_program__name(prog) == name)
        prog = lib.bpf_object__next_program(handle, prog)
    return handle


@lru_cache(maxsize=1)
def _libbpf() -> ctypes.CDLL:
    lib = maps.libbpf()
    vp, c_int = ctypes.c_void_p, ctypes.c_int
    for fn, res, args in (("libbpf_set_print", vp, [vp]), ("bpf_object__open_file", vp, [ctypes.c_char_p, vp]),
                          ("bpf_object__next_program", vp, [vp, vp]), ("bpf_program__name", ctypes.c_char_p, [vp]),
                          ("bpf_program__set_autoload", c_int, [vp, ctypes.c_bool]),
                          ("bpf_object__find_program_by_name", vp, [vp, ctypes.c_char_p]),
                          ("bpf_object__load", c_int, [vp]), ("bpf_object__close", None, [vp]),
                          ("bpf_program__fd", c_int, [vp]), ("bpf_program__set_type", c_int, [vp, c_int]),
                          ("bpf_program__set_expected_attach_type", c_int, [vp, c_int]),
                          ("bpf_program__set_attach_target", c_int, [vp, c_int, ctypes.c_char_p]),
                          ("bpf_raw_tracepoint_open", c_int, [ctypes.c_char_p, c_int]),
                          ("btf__find_by_name_kind", ctypes.c_int32, [vp, ctypes.c_char_p, ctypes.c_uint32])):
        getattr(lib, fn).restype, getattr(lib, fn).argtypes = res, args
    return lib


def libxdp_role(program_id: int, name: str | None) -> tuple[str | None, int | None]:
    """('dispatcher', None) for libxdp's dispatcher, ('program', run priority) for a program built for
    libxdp (its BTF carries libxdp's run config) attached on its own, else (None, None)."""
    if name == DISPATCHER_NAME:
        return "dispatcher", None
    lib = libxdp()
    if lib is None:
        return None, None
    prog = lib.xdp_program__from_id(program_id)
    if not prog or lib.libxdp_get_error(prog):
        return None, None
    try:
        btf = lib.xdp_program__btf(prog)
        if not btf or _libbpf().btf__find_by_name_kind(btf, RUN_CONFIG_SECTION, _BTF_KIND_DATASEC) < 0:
            return None, None
        return "program", int(lib.xdp_program__run_prio(prog))
    finally:
        lib.xdp_program__close(prog)


def neighbour_text(interface: str, program_id: int, name: str | None) -> str:
    """The clause the refusal of a foreign program adds when it is a libxdp one ('' otherwise)."""
    role, prio = libxdp_role(program_id, name)
    if role is None:
        return ""
    usable, why = dispatcher_support()
    what = ("it is libxdp's multi-program dispatcher (`xdp-loader status " + interface + "` lists what it runs)"
            if role == "dispatcher" else f"it is a libxdp program (run priority {prio}) attached without a dispatcher")
    how = ("portwatch's BCC-loaded program does not join libxdp's dispatcher" if usable
           else f"libxdp's dispatcher cannot chain portwatch beside it here: {why}")
    return f"; {what}, and {how}"


def attach_text() -> str:
    """How portwatch attaches its program, for the pin record and status: always a plain attach."""
    usable, why = dispatcher_support()
    return ("plain XDP attach (portwatch does not join libxdp's dispatcher)" if usable
            else f"plain XDP attach (libxdp's dispatcher is not usable: {why})")
