"""A small pure-Python reader of raw BTF (``/sys/kernel/btf/vmlinux`` and split module BTF such as
``/sys/kernel/btf/kvm``), enough for kvmtrace's needs:

- function name -> parameter names in order (``FUNC`` -> ``FUNC_PROTO`` params),
- struct/union member byte offsets and sizes (anonymous members flattened), struct sizes,
- array element counts of members,

following typedefs and modifiers (const/volatile/restrict/type_tag). No bcc, no root: the BTF
files are world-readable.

Format: include/uapi/linux/btf.h and Documentation/bpf/btf.rst. The type section is one pass of
variable-length records; we index record offsets once (~0.1-0.3 s for vmlinux) and decode names
lazily. Split BTF (modules) continues the base's type ids after the base's last id, and its string
offsets continue after the base's string section.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

BTF_MAGIC = 0xEB9F

# kinds (include/uapi/linux/btf.h)
KIND_INT = 1
KIND_PTR = 2
KIND_ARRAY = 3
KIND_STRUCT = 4
KIND_UNION = 5
KIND_ENUM = 6
KIND_FWD = 7
KIND_TYPEDEF = 8
KIND_VOLATILE = 9
KIND_CONST = 10
KIND_RESTRICT = 11
KIND_FUNC = 12
KIND_FUNC_PROTO = 13
KIND_VAR = 14
KIND_DATASEC = 15
KIND_FLOAT = 16
KIND_DECL_TAG = 17
KIND_TYPE_TAG = 18
KIND_ENUM64 = 19

_MODIFIERS = (KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG)
_HDR = struct.Struct("<HBBIIIII")  # magic, version, flags, hdr_len, type_off, type_len, str_off, str_len
_TYPE = struct.Struct("<III")  # name_off, info, size/type
_U32 = struct.Struct("<I")
_MEMBER = struct.Struct("<III")
_PARAM = struct.Struct("<II")
_ARRAY = struct.Struct("<III")
_POINTER_SIZE = 8  # kvmtrace supports 64-bit hosts only (x86-64, arm64)


class BtfError(Exception):
    """Malformed or unsupported BTF data."""


@dataclass(frozen=True)
class Member:
    name: str
    offset: int  # bytes from the start of the outermost struct
    size: Optional[int]  # bytes; None when not computable (flexible array, forward decl)
    nelems: Optional[int] = None  # element count when the member is an array
    bitfield: bool = False


@dataclass(frozen=True)
class StructLayout:
    name: str
    size: int
    members: Dict[str, Member]

    def offset(self, member: str) -> Optional[int]:
        m = self.members.get(member)
        return None if m is None else m.offset


class Btf:
    """Parsed BTF. ``base`` is the vmlinux Btf for split (module) BTF."""

    def __init__(self, data: bytes, base: Optional["Btf"] = None, name: str = "vmlinux"):
        self.name = name
        self.base = base
        if len(data) < _HDR.size:
            raise BtfError(f"{name}: BTF too short")
        magic, version, _flags, hdr_len, type_off, type_len, str_off, str_len = _HDR.unpack_from(data, 0)
        if magic != BTF_MAGIC:
            raise BtfError(f"{name}: bad BTF magic {magic:#x}")
        if version != 1:
            raise BtfError(f"{name}: unsupported BTF version {version}")
        self._data = data
        self._types_start = hdr_len + type_off
        self._types_end = self._types_start + type_len
        self._str_start = hdr_len + str_off
        self._str_end = self._str_start + str_len
        self._strings = data[self._str_start : self._str_end]
        if base is None:
            self.first_id = 1
            self.str_base = 0
        else:
            self.first_id = base.first_id + len(base._offsets)
            self.str_base = base.str_base + len(base._strings)
        self._offsets: List[int] = []
        self._by_name: Optional[Dict[int, List[int]]] = None
        self._index()

    # --- loading -------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str, base: Optional["Btf"] = None, name: Optional[str] = None) -> "Btf":
        with open(path, "rb") as f:
            data = f.read()
        return cls(data, base=base, name=name or path.rsplit("/", 1)[-1])

    def _index(self) -> None:
        """One pass over the type section recording each record's offset."""
        data = self._data
        pos = self._types_start
        end = self._types_end
        offsets = self._offsets
        unpack = _TYPE.unpack_from
        while pos < end:
            offsets.append(pos)
            _name, info, _st = unpack(data, pos)
            kind = (info >> 24) & 0x1F
            vlen = info & 0xFFFF
            pos += 12
            if kind == KIND_INT or kind == KIND_VAR or kind == KIND_DECL_TAG:
                pos += 4
            elif kind == KIND_ARRAY:
                pos += 12
            elif kind == KIND_STRUCT or kind == KIND_UNION or kind == KIND_DATASEC or kind == KIND_ENUM64:
                pos += 12 * vlen
            elif kind == KIND_ENUM or kind == KIND_FUNC_PROTO:
                pos += 8 * vlen
            elif kind in (KIND_PTR, KIND_FWD, KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT,
                          KIND_FUNC, KIND_FLOAT, KIND_TYPE_TAG):
                pass
            else:
                raise BtfError(f"{self.name}: unknown BTF kind {kind} at type #{len(offsets)}")
        if pos != end:
            raise BtfError(f"{self.name}: type section overruns its length")

    def _build_name_index(self) -> Dict[int, List[int]]:
        """name_off -> type ids, for the named kinds we look up by name (functions, structs,
        unions, typedefs). Names stay undecoded until asked for."""
        if self._by_name is None:
            idx: Dict[int, List[int]] = {}
            data = self._data
            unpack = _TYPE.unpack_from
            first = self.first_id
            for i, pos in enumerate(self._offsets):
                name_off, info, _ = unpack(data, pos)
                if name_off == 0:
                    continue
                kind = (info >> 24) & 0x1F
                if kind in (KIND_FUNC, KIND_STRUCT, KIND_UNION, KIND_TYPEDEF):
                    idx.setdefault(name_off, []).append(first + i)
            self._by_name = idx
        return self._by_name

    # --- strings -------------------------------------------------------------------------

    def string(self, off: int) -> str:
        if off < self.str_base:
            if self.base is None:
                raise BtfError(f"{self.name}: string offset {off} below this BTF")
            return self.base.string(off)
        local = off - self.str_base
        end = self._strings.find(b"\0", local)
        if end < 0:
            end = len(self._strings)
        return self._strings[local:end].decode("utf-8", "replace")

    def _string_offsets(self, name: str) -> List[int]:
        """Global string offsets (in this BTF's numbering) of ``name``, exact matches only."""
        needle = name.encode()
        out = []
        s = self._strings
        # strings are NUL-separated; the section starts with the empty string
        start = 0
        while True:
            i = s.find(b"\0" + needle + b"\0", start)
            if i < 0:
                break
            out.append(self.str_base + i + 1)
            start = i + 1
        return out

    # --- raw type access -----------------------------------------------------------------

    @property
    def last_id(self) -> int:
        return self.first_id + len(self._offsets) - 1

    def _owner(self, tid: int) -> "Btf":
        if tid < self.first_id:
            if self.base is None:
                raise BtfError(f"{self.name}: type id {tid} not in this BTF")
            return self.base._owner(tid)
        return self

    def _rec(self, tid: int) -> Tuple["Btf", int, int, int, int, int]:
        """(owner, pos, name_off, kind, vlen, size_or_type) of type ``tid`` (tid > 0)."""
        owner = self._owner(tid)
        i = tid - owner.first_id
        if i < 0 or i >= len(owner._offsets):
            raise BtfError(f"{self.name}: type id {tid} out of range")
        pos = owner._offsets[i]
        name_off, info, st = _TYPE.unpack_from(owner._data, pos)
        return owner, pos, name_off, (info >> 24) & 0x1F, info & 0xFFFF, st

    def _kind_flag(self, tid: int) -> bool:
        owner = self._owner(tid)
        pos = owner._offsets[tid - owner.first_id]
        return bool(_U32.unpack_from(owner._data, pos + 4)[0] >> 31)

    def kind(self, tid: int) -> int:
        return self._rec(tid)[3]

    def type_name(self, tid: int) -> str:
        if tid == 0:
            return "void"
        owner, _, name_off, _, _, _ = self._rec(tid)
        return owner.string(name_off)

    def resolve(self, tid: int) -> int:
        """Follow typedefs and modifiers to the underlying type id (0 = void)."""
        seen = 0
        while tid:
            _, _, _, kind, _, st = self._rec(tid)
            if kind not in _MODIFIERS:
                return tid
            tid = st
            seen += 1
            if seen > 64:
                raise BtfError(f"{self.name}: modifier loop at type {tid}")
        return 0

    def sizeof(self, tid: int) -> Optional[int]:
        tid = self.resolve(tid)
        if tid == 0:
            return None
        owner, pos, _, kind, _, st = self._rec(tid)
        if kind in (KIND_INT, KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_ENUM64, KIND_FLOAT, KIND_DATASEC):
            return st
        if kind == KIND_PTR:
            return _POINTER_SIZE
        if kind == KIND_ARRAY:
            elem, _idx, nelems = _ARRAY.unpack_from(owner._data, pos + 12)
            es = self.sizeof(elem)
            return None if es is None else es * nelems
        return None

    def ids_by_name(self, name: str, kinds: Tuple[int, ...]) -> List[int]:
        """Type ids named ``name`` of the given kinds, in this BTF and its base."""
        out: List[int] = []
        if self.base is not None:
            out.extend(self.base.ids_by_name(name, kinds))
        idx = self._build_name_index()
        for off in self._string_offsets(name):
            for tid in idx.get(off, ()):
                if self.kind(tid) in kinds:
                    out.append(tid)
        return out

    # --- functions -----------------------------------------------------------------------

    def func_params(self, name: str) -> Optional[Tuple[str, ...]]:
        """Ordered parameter names of function ``name`` (None when BTF has no such FUNC).
        Unnamed parameters appear as ""; a trailing ``...`` is dropped."""
        for tid in self.ids_by_name(name, (KIND_FUNC,)):
            proto = self._rec(tid)[5]
            owner, pos, _, kind, vlen, _ = self._rec(proto)
            if kind != KIND_FUNC_PROTO:
                continue
            names = []
            for k in range(vlen):
                pname, ptype = _PARAM.unpack_from(owner._data, pos + 12 + 8 * k)
                if pname == 0 and ptype == 0:  # varargs
                    continue
                names.append(owner.string(pname) if pname else "")
            return tuple(names)
        return None

    def has_func(self, name: str) -> bool:
        return bool(self.ids_by_name(name, (KIND_FUNC,)))

    # --- structs -------------------------------------------------------------------------

    def struct(self, name: str) -> Optional[StructLayout]:
        """Layout of struct (or union) ``name``: a complete definition (not a forward
        declaration), anonymous struct/union members flattened into the parent."""
        for tid in self.ids_by_name(name, (KIND_STRUCT, KIND_UNION)):
            owner, pos, _, kind, vlen, size = self._rec(tid)
            members: Dict[str, Member] = {}
            self._collect(tid, 0, members)
            return StructLayout(name=name, size=size, members=members)
        # typedef'd anonymous struct
        for tid in self.ids_by_name(name, (KIND_TYPEDEF,)):
            rt = self.resolve(tid)
            if rt and self.kind(rt) in (KIND_STRUCT, KIND_UNION):
                members = {}
                self._collect(rt, 0, members)
                return StructLayout(name=name, size=self.sizeof(rt) or 0, members=members)
        return None

    def _collect(self, tid: int, base_off: int, out: Dict[str, Member]) -> None:
        owner, pos, _, kind, vlen, _ = self._rec(tid)
        kflag = self._kind_flag(tid)
        for k in range(vlen):
            mname_off, mtype, moff = _MEMBER.unpack_from(owner._data, pos + 12 + 12 * k)
            if kflag:
                bitsize = moff >> 24
                bitoff = moff & 0xFFFFFF
            else:
                bitsize = 0
                bitoff = moff
            off = base_off + bitoff // 8
            mname = owner.string(mname_off) if mname_off else ""
            rt = self.resolve(mtype)
            rkind = self.kind(rt) if rt else 0
            if not mname:
                if rkind in (KIND_STRUCT, KIND_UNION):
                    self._collect(rt, off, out)
                continue
            nelems = None
            if rkind == KIND_ARRAY:
                ao, apos, _, _, _, _ = self._rec(rt)
                nelems = _ARRAY.unpack_from(ao._data, apos + 12)[2]
            if mname not in out:
                out[mname] = Member(
                    name=mname,
                    offset=off,
                    size=self.sizeof(mtype),
                    nelems=nelems,
                    bitfield=bool(bitsize) or bool(bitoff % 8),
                )


def load_vmlinux(path: str = "/sys/kernel/btf/vmlinux") -> Btf:
    return Btf.from_file(path, name="vmlinux")


def load_module(name: str, base: Btf, directory: str = "/sys/kernel/btf") -> Btf:
    return Btf.from_file(f"{directory}/{name}", base=base, name=name)
