"""Notice every out-of-memory of the JavaScript engine on the host side, whatever the action catches.

QuickJS turns a failed allocation into a *catchable* ``InternalError: out of
memory``; when the heap is so full that even that error object cannot be
allocated, the engine throws ``null`` instead, and no JavaScript hook (such
as ``Error.prepareStackTrace``) ever runs. An action can therefore catch an
engine OOM, free its hog and carry on. The engine has no out-of-memory
callback, so the worker watches the one thing every such throw does first:
format its message. ``JS_ThrowError`` (reached from ``JS_ThrowOutOfMemory``
and from the regexp engine's own "out of memory in regexp execution")
calls ``vsnprintf`` through the extension's procedure linkage table, before
it tries to allocate anything. :func:`install` points that one table slot
at :func:`_watch`, which raises :data:`seen` when the format starts with
"out of memory" and forwards every call to the C library's ``vsnprintf``.

Only message formatting (a thrown engine error, a stack trace) passes
through Python; allocations do not. The slot is found by reading the
extension's own ELF relocations and is only written when it holds what the
dynamic linker would have put there (the C library's function, or the lazy
binding stub inside the extension); otherwise nothing is patched and
:func:`install` says so. It runs at import, in the fork template, before the
sandbox, like the interrupt handler: the callback's trampoline needs
executable memory and the slot may lie in a read-only (RELRO) page.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
import sys

OOM_PREFIX = b"out of memory"
# ELF relocation types of a function pointer slot: (JUMP_SLOT, GLOB_DAT) per machine
_SLOT_TYPES = {62: (7, 6), 183: (1026, 1025)}  # EM_X86_64, EM_AARCH64
_PT_GNU_RELRO = 0x6474E552
_PROT_READ, _PROT_WRITE = 1, 2

seen = [False]  # raised by any engine out-of-memory since the last reset(); read by worker._js

_VSNPRINTF = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mprotect.restype = ctypes.c_int
_real_vsnprintf = _VSNPRINTF(ctypes.cast(_libc.vsnprintf, ctypes.c_void_p).value)


def _is_oom(fmt: int | None) -> bool:
    # a format string is a short C string in the engine's read-only data: read up to its NUL
    return bool(fmt) and (ctypes.cast(fmt, ctypes.c_char_p).value or b"").startswith(OOM_PREFIX)


def _watch(buf: int | None, size: int, fmt: int | None, ap: int | None) -> int:
    if _is_oom(fmt):
        seen[0] = True
    return int(_real_vsnprintf(buf, size, fmt, ap))


_watch_c = _VSNPRINTF(_watch)


def reset() -> None:
    seen[0] = False


def _slot_offset(path: str, symbol: bytes, anchor: bytes) -> tuple[int, int, tuple[int, int] | None, tuple[int, int]]:
    """(slot vaddr of ``symbol``'s relocation, ``anchor``'s vaddr, RELRO range, loaded range) from the ELF file."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a little-endian ELF64 file")
    machine = struct.unpack_from("<H", data, 18)[0]
    if machine not in _SLOT_TYPES:
        raise ValueError(f"unsupported machine {machine}")
    phoff, shoff = struct.unpack_from("<QQ", data, 32)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", data, 54)
    relro = None
    lo, hi = 1 << 64, 0
    for i in range(phnum):
        p_type, _flags, _off, vaddr, _paddr, _filesz, memsz = struct.unpack_from("<IIQQQQQ", data,
                                                                                 phoff + i * phentsize)
        if p_type == _PT_GNU_RELRO:
            relro = (vaddr, vaddr + memsz)
        elif p_type == 1:  # PT_LOAD
            lo, hi = min(lo, vaddr), max(hi, vaddr + memsz)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]

    def sym(symtab: tuple[int, ...], index: int) -> tuple[bytes, int]:
        strtab = sections[symtab[6]]
        name_off, _info, _other, _shndx, value, _size = struct.unpack_from("<IBBHQQ", data, symtab[4] + index * 24)
        start = strtab[4] + name_off
        return data[start:data.index(b"\0", start)], value

    slot = anchor_at = None
    for sh in sections:
        if sh[1] == 11:  # SHT_DYNSYM: where the anchor symbol lies
            for index in range(sh[5] // 24):
                name, value = sym(sh, index)
                if name == anchor and value:
                    anchor_at = value
        if sh[1] == 4:   # SHT_RELA
            symtab = sections[sh[6]]
            for off in range(sh[4], sh[4] + sh[5], 24):
                r_offset, r_info, _addend = struct.unpack_from("<QQq", data, off)
                if (r_info & 0xFFFFFFFF) in _SLOT_TYPES[machine] and sym(symtab, r_info >> 32)[0] == symbol:
                    slot = r_offset
    if slot is None or anchor_at is None:
        raise ValueError(f"no relocation for {symbol.decode()} (or no {anchor.decode()})")
    return slot, anchor_at, relro, (lo, hi)


def install(lib: ctypes.CDLL, path: str) -> str | None:
    """Route the extension's ``vsnprintf`` through :func:`_watch`; None when done, else why not."""
    if not sys.platform.startswith("linux"):
        return "only Linux ELF extensions are patched"
    try:
        slot_vaddr, anchor_vaddr, relro, loaded = _slot_offset(path, b"vsnprintf", b"JS_GetRuntime")
    except (OSError, ValueError, IndexError, struct.error) as exc:
        return f"cannot read the engine's relocations: {exc}"
    base = ctypes.cast(lib.JS_GetRuntime, ctypes.c_void_p).value - anchor_vaddr
    slot = ctypes.c_void_p.from_address(base + slot_vaddr)
    current = slot.value or 0
    mine = ctypes.cast(_watch_c, ctypes.c_void_p).value
    if current == mine:
        return None
    real = ctypes.cast(_real_vsnprintf, ctypes.c_void_p).value
    in_lib = base + loaded[0] <= current < base + loaded[1]  # the lazy-binding stub, not yet resolved
    if current != real and not in_lib:
        return "the engine's vsnprintf slot holds an unexpected address (interposed?): left alone"
    protect = relro is not None and relro[0] <= slot_vaddr < relro[1]
    page = (base + slot_vaddr) & ~(mmap.PAGESIZE - 1)
    if protect and _libc.mprotect(page, mmap.PAGESIZE, _PROT_READ | _PROT_WRITE) != 0:
        return f"mprotect failed: errno {ctypes.get_errno()}"
    slot.value = mine
    if protect:
        _libc.mprotect(page, mmap.PAGESIZE, _PROT_READ)
    return None
