"""Independent reader of adadim's GPTQ v1 export, in numpy (no adadim code).

Reads the sample written by
    cargo test --release -p adadim-pack --test gptq_export -- --ignored write_sample
(target/gptq_export_sample.safetensors), parses the safetensors container by hand, unpacks
qweight / qzeros (little-endian bit streams along C_in / C_out, zeros stored minus one),
dequantizes W[o, c] = scales[g_idx[c], o] * (q[o, c] - zeros[g_idx[c], o]) in float32, and
writes gptq_export_fixture.json next to this file: the file's SHA-256 and, per linear, the
SHA-256 of the dequantized float32 weights (row-major [C_out, C_in], little-endian), which
crates/pack/tests/gptq_export.rs compares with adadim's own dequantization.
"""
import hashlib, json, os, struct, sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DTYPES = {"I32": np.int32, "F16": np.float16, "F32": np.float32, "U8": np.uint8}


def read_safetensors(path):
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        a, b = t["data_offsets"]
        out[name] = np.frombuffer(data[a:b], dtype=DTYPES[t["dtype"]]).reshape(t["shape"])
    return raw, out


def unpack_stream(words_le, count, bits):
    """count values of `bits` bits from a little-endian stream of int32 words."""
    stream = np.frombuffer(words_le.astype("<i4").tobytes(), dtype=np.uint8)
    bitarr = np.unpackbits(stream, bitorder="little")
    vals = bitarr[: count * bits].reshape(count, bits)
    return (vals * (1 << np.arange(bits))).sum(axis=1)


def dequantize(t, name, bits):
    qweight, qzeros, scales, g_idx = (t[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx"))
    c_in, c_out = g_idx.shape[0], qweight.shape[1]
    q = np.stack([unpack_stream(qweight[:, o], c_in, bits) for o in range(c_out)])  # [c_out, c_in]
    z = np.stack([unpack_stream(qzeros[k], c_out, bits) for k in range(qzeros.shape[0])]) + 1  # [groups, c_out]
    s = scales.astype(np.float32)
    g = g_idx.astype(np.int64)
    w = s[g, :].T * (q.astype(np.float32) - z[g, :].T.astype(np.float32))
    return w.astype(np.float32)


def main():
    path = os.path.join(HERE, "..", "..", "target", "gptq_export_sample.safetensors")
    raw, t = read_safetensors(path)
    names = sorted(k[: -len(".qweight")] for k in t if k.endswith(".qweight"))
    out = {"about": "numpy reader of adadim's GPTQ v1 export (tests/reference/gptq_export_reader.py)",
           "file_sha256": hashlib.sha256(raw).hexdigest(), "linears": {}}
    for name in names:
        # GPTQ keeps the width in quantize_config.json; here it follows from the packed height.
        bits = t[f"{name}.qweight"].shape[0] * 32 // t[f"{name}.g_idx"].shape[0]
        w = dequantize(t, name, bits)
        out["linears"][name] = {"shape": list(w.shape), "weights_sha256": hashlib.sha256(w.astype("<f4").tobytes()).hexdigest(),
                                "first": [float(v) for v in w.reshape(-1)[:8]]}
        print(name, w.shape, out["linears"][name]["weights_sha256"][:16])
    with open(os.path.join(HERE, "gptq_export_fixture.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
