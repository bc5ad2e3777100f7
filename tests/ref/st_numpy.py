"""An independent safetensors reader/writer and FP8/BF16 codecs in NumPy, written from the format
descriptions rather than from xprec's C code, so tests can check what the C side writes."""
import json
import math
import os
import struct

import numpy as np

_NP = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "I64": np.int64, "I32": np.int32,
       "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_SIZE = {"F32": 4, "F64": 8, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8,
         "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8}


def e4m3_value(code):
    """Value of an E4M3FN code from its bit fields: 1 sign, 4 exponent (bias 7), 3 mantissa."""
    sign = -1.0 if code & 0x80 else 1.0
    exp = (code >> 3) & 0xF
    man = code & 0x7
    if exp == 0xF and man == 0x7:
        return math.nan
    if exp == 0:
        return sign * math.ldexp(man / 8.0, -6)
    return sign * math.ldexp(1.0 + man / 8.0, exp - 7)


E4M3 = np.array([e4m3_value(c) for c in range(256)], dtype=np.float64)


def bf16_to_f32(u16):
    return (u16.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x):
    """Round to nearest even, on the bit pattern."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return r.astype(np.uint16)


class Tensor:
    def __init__(self, name, dtype, shape, raw):
        self.name, self.dtype, self.shape, self.raw = name, dtype, list(shape), raw

    def array(self):
        """Values as float32 (raw codes decoded for F8_E4M3, no scales applied)."""
        if self.dtype == "BF16":
            a = bf16_to_f32(np.frombuffer(self.raw, dtype=np.uint16))
        elif self.dtype == "F8_E4M3":
            a = E4M3[np.frombuffer(self.raw, dtype=np.uint8)].astype(np.float32)
        else:
            a = np.frombuffer(self.raw, dtype=_NP[self.dtype]).astype(np.float32)
        return a.reshape(self.shape)

    def bits(self):
        return bytes(self.raw)


def read_file(path):
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n].decode("utf-8"))
    data = blob[8 + n:]
    meta = header.pop("__metadata__", None)
    out = {}
    for name, e in header.items():
        b, end = e["data_offsets"]
        out[name] = Tensor(name, e["dtype"], e["shape"], data[b:end])
    return out, meta, n


def read_dir(d, stem="model"):
    single = os.path.join(d, stem + ".safetensors")
    if os.path.exists(single):
        return read_file(single)[0]
    with open(os.path.join(d, stem + ".safetensors.index.json")) as f:
        index = json.load(f)
    out = {}
    for fn in sorted(set(index["weight_map"].values())):
        out.update(read_file(os.path.join(d, fn))[0])
    return out


def write_file(path, tensors, metadata=None):
    """tensors: name -> (dtype string, shape, raw bytes)."""
    header, off, blobs = {}, 0, []
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, (dt, shape, raw) in tensors.items():
        assert len(raw) == _SIZE[dt] * int(np.prod(shape, dtype=np.int64))
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + len(raw)]}
        off += len(raw)
        blobs.append(raw)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def e4m3_step(code_values):
    """Spacing of E4M3 values at each (decoded, unscaled) value's magnitude: 2^(e-3) for normal
    values with exponent e, 2^-9 in the subnormal range."""
    a = np.abs(code_values.astype(np.float64))
    e = np.floor(np.log2(np.maximum(a, 2.0 ** -6)))
    return np.where(a < 2.0 ** -6, 2.0 ** -9, 2.0 ** (e - 3))


def e4m3_round(x):
    """x (float32, |x| <= 448) to the nearest E4M3 value, ties to the even code."""
    pos = E4M3[:0x7F]  # the non-negative finite values, ascending with the code
    a = np.abs(x.astype(np.float64))
    hi = np.clip(np.searchsorted(pos, a), 1, len(pos) - 1)
    lo = hi - 1
    dl, dh = a - pos[lo], pos[hi] - a
    code = np.where(dl < dh, lo, np.where(dh < dl, hi, np.where(lo % 2 == 0, lo, hi)))
    return np.copysign(pos[code], x)
