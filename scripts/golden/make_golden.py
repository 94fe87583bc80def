#!/usr/bin/env python3
"""Golden fixtures for dsv4: a random DeepSeek-V4 checkpoint in the official layout plus
transformers' logits for it (prefill, checked against step-by-step cached decode) and MTP
reference logits built from transformers' decoder layer and the official MTP wiring.

Usage (on the device machine, which has transformers >= 5.17 and torch):
    python scripts/golden/make_golden.py --config scripts/golden/configs/tiny.json \
        --seed 1 --out /tmp/gold/tiny [--lengths 7,40,80]

Input: a config JSON in the official hub layout (what src/model/config.cpp reads).
Output directory:
    config.json          the input config + `layer_types` (transformers cannot map ratios
                         other than 0/4/128) + `compress_rate_csa` / `compress_rate_hca`
    model.safetensors    official tensor names and dtypes (FP8 E4M3 + E8M0 block scales,
                         packed FP4 I8 + E8M0 group scales, BF16, F32, I64)
    cases.json           token ids per case + everything that was asserted / measured
    <case>.logits.npy    float32 [T, vocab]: transformers prefill logits
    <case>.mtp.npy       float32 [T-1, vocab]: row t = MTP logits from the main model's final
                         streams at position t and token tokens[t+1], MTP position t

Everything is checked loudly: missing/unexpected keys on load, every transformers
parameter equal to the dequantised checkpoint value, transformers' derived config
(layer types, compress rates, RoPE/YaRN frequencies) equal to the official semantics,
prefill == cached decode (and chunked prefill), MTP prefill == MTP cached decode,
float32 run == float64 run (tie sensitivity of the discrete top-k choices).
See docs/TESTING.md, section 'Golden fixtures'.
"""

import argparse
import copy
import json
import math
import os
import re
import shutil
import struct
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

FP8_BLOCK = 128
FP4_GROUP = 32
E4M3_MAX = 448.0
E2M1_MAX = 6.0
E2M1_VALUES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def log(*a):
    print(*a, flush=True)


class GoldenError(RuntimeError):
    pass


def check(cond, msg):
    if not cond:
        raise GoldenError(msg)


# ----------------------------------------------------------------------------------------------
# Config handling (official semantics)
# ----------------------------------------------------------------------------------------------


class Cfg:
    """The fields of the official config that define the architecture, as dsv4 reads them."""

    def __init__(self, j):
        self.j = j
        g = j.get
        self.V = j["vocab_size"]
        self.D = j["hidden_size"]
        self.L = j["num_hidden_layers"]
        self.H = j["num_attention_heads"]
        self.hd = j["head_dim"]
        self.rd = j["qk_rope_head_dim"]
        self.Rq = j["q_lora_rank"]
        self.Ro = j["o_lora_rank"]
        self.G = j["o_groups"]
        self.I = j["moe_intermediate_size"]
        self.E = j["n_routed_experts"]
        self.K = j["num_experts_per_tok"]
        self.n_shared = g("n_shared_experts", 1)
        self.n_hash = g("num_hash_layers", 0)
        self.window = j["sliding_window"]
        self.Hi = j["index_n_heads"]
        self.di = j["index_head_dim"]
        self.topk = j["index_topk"]
        self.m = g("hc_mult", 4)
        self.n_mtp = g("num_nextn_predict_layers", 0)
        self.csa = g("compress_rate_csa", 4)
        ratios = [0 if r <= 1 else r for r in j["compress_ratios"]]
        check(len(ratios) >= self.L, "compress_ratios shorter than num_hidden_layers")
        self.ratios = ratios[: self.L] + [ratios[self.L + i] if self.L + i < len(ratios) else 0 for i in range(self.n_mtp)]
        hca = sorted({r for r in self.ratios if r not in (0, self.csa)})
        check(len(hca) <= 1, f"transformers supports a single HCA ratio, config has {hca}")
        self.hca = hca[0] if hca else j.get("compress_rate_hca", 128)
        self.fp4_experts = g("expert_dtype") == "fp4"
        check(g("expert_dtype") in (None, "fp4", "fp8"), "expert_dtype must be fp4, fp8 or absent")
        rs = g("rope_scaling") or {}
        self.yarn = rs.get("type", rs.get("rope_type", "default")) == "yarn"
        self.rope_scaling = rs
        self.rope_theta = g("rope_theta", 10000.0)
        self.compress_rope_theta = g("compress_rope_theta", 160000.0)
        self.n_shared = g("n_shared_experts", 1)
        check(self.n_shared == 1, "the golden generator expects n_shared_experts == 1 (official asserts it)")
        check(self.csa == 4, "official code only overlaps windows for ratio 4 (Compressor.overlap = ratio == 4)")
        check(self.H % self.G == 0, "heads % o_groups")
        check(self.rd % 2 == 0 and self.rd <= self.hd and self.rd <= self.di, "rope dims")
        check(self.n_hash <= self.L, "num_hash_layers > num_hidden_layers")

    def kind(self, layer):
        r = self.ratios[layer]
        return "sliding_attention" if r == 0 else (
            "compressed_sparse_attention" if r == self.csa else "heavily_compressed_attention")

    def layer_types(self):
        return [self.kind(i) for i in range(self.L)]


def stored_config(cfg_json, cfg):
    """config.json written next to the checkpoint: input + the fields transformers needs."""
    out = {k: v for k, v in cfg_json.items() if not k.startswith("_")}
    out["layer_types"] = cfg.layer_types()
    out["compress_rate_csa"] = cfg.csa
    out["compress_rate_hca"] = cfg.hca
    out.setdefault("architectures", ["DeepseekV4ForCausalLM"])
    return out


def hf_config_dict(stored):
    d = {k: v for k, v in stored.items() if k != "quantization_config"}
    return d


def official_inv_freq(dim, base, yarn=None):
    """RoPE frequencies of the official precompute_freqs_cis, written from the formula."""
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if yarn is not None:
        factor, orig, beta_fast, beta_slow = yarn

        def corr_dim(n_rot):
            return dim * math.log(orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))

        lo = max(math.floor(corr_dim(beta_fast)), 0)
        hi = min(math.ceil(corr_dim(beta_slow)), dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo), 0, 1)
        freqs = freqs / factor * ramp + freqs * (1 - ramp)
    return freqs


# ----------------------------------------------------------------------------------------------
# Quantisation to the official formats (and exact dequantisation)
# ----------------------------------------------------------------------------------------------


def pow2_exponent(amax, qmax):
    """Smallest integer e with amax / 2^e <= qmax (e = 0 for amax == 0). float64 in, int64 out."""
    r = amax / qmax
    mant, ex = torch.frexp(r)  # r = mant * 2^ex, mant in [0.5, 1)
    e = torch.where(mant == 0.5, ex - 1, ex).to(torch.int64)
    e = torch.where(amax > 0, e, torch.zeros_like(e))
    check(bool((e >= -127).all() and (e <= 127).all()), "scale exponent out of E8M0 range")
    scale = torch.pow(2.0, e.to(torch.float64))
    check(bool((amax / scale <= qmax).all()), "scale too small")
    check(bool(((amax == 0) | (amax / (scale / 2) > qmax)).all()), "scale not the smallest power of two")
    return e


def e8m0_bytes(e):
    return (e + 127).to(torch.uint8).view(torch.float8_e8m0fnu)


def quant_fp8(w):
    """[out, in] float32 -> (F8_E4M3 [out,in], F8_E8M0 [ceil(out/128), ceil(in/128)], dequantised f32)."""
    out, inn = w.shape
    so, si = -(-out // FP8_BLOCK), -(-inn // FP8_BLOCK)
    w64 = w.to(torch.float64)
    pad = torch.zeros(so * FP8_BLOCK, si * FP8_BLOCK, dtype=torch.float64)
    pad[:out, :inn] = w64
    amax = pad.abs().view(so, FP8_BLOCK, si, FP8_BLOCK).amax(dim=(1, 3))
    e = pow2_exponent(amax, E4M3_MAX)
    scale = torch.pow(2.0, e.to(torch.float64))
    full = scale.repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)[:out, :inn]
    q = (w64 / full).to(torch.float32).to(torch.float8_e4m3fn)
    deq = (q.to(torch.float64) * full).to(torch.float32)
    check(bool(torch.isfinite(deq).all()), "FP8 quantisation produced non-finite values")
    return q, e8m0_bytes(e), deq


def dequant_fp8(q, s):
    out, inn = q.shape
    e = s.view(torch.uint8).to(torch.int64) - 127
    full = torch.pow(2.0, e.to(torch.float64)).repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)
    return (q.to(torch.float64) * full[:out, :inn]).to(torch.float32)


def quant_fp4(w):
    """[out, in] float32 -> (I8 [out, in/2] two e2m1 codes per byte, low nibble = even column;
    F8_E8M0 [out, in/32]; dequantised f32). Round to nearest, ties to the even code."""
    out, inn = w.shape
    check(inn % FP4_GROUP == 0, "FP4 needs in % 32 == 0")
    g = w.to(torch.float64).view(out, inn // FP4_GROUP, FP4_GROUP)
    amax = g.abs().amax(-1)
    e = pow2_exponent(amax, E2M1_MAX)
    v = g / torch.pow(2.0, e.to(torch.float64)).unsqueeze(-1)
    a = v.abs()
    code = torch.zeros_like(a, dtype=torch.int64)
    mids = [(E2M1_VALUES[i] + E2M1_VALUES[i + 1]) / 2 for i in range(7)]
    for i, mid in enumerate(mids):
        code += (a > mid).to(torch.int64)
        if (i + 1) % 2 == 0:  # exact tie between codes i and i+1 goes to the even code
            code += (a == mid).to(torch.int64)
    nib = code | (((v < 0) & (code > 0)).to(torch.int64) << 3)
    nib = nib.view(out, inn)
    packed = (nib[:, 0::2] | (nib[:, 1::2] << 4)).to(torch.uint8).view(torch.int8)
    s = e8m0_bytes(e)
    deq = dequant_fp4(packed, s)
    # independent check of the rounding: nearest grid value (ties are measure-zero for random data)
    grid = torch.tensor(E2M1_VALUES, dtype=torch.float64)
    dist = (a.unsqueeze(-1) - grid).abs()
    two = dist.topk(2, dim=-1, largest=False).values
    tie = (two[..., 0] == two[..., 1]).view(out, inn)
    nearest = grid[dist.argmin(-1)] * torch.sign(v)
    ref = (nearest * torch.pow(2.0, e.to(torch.float64)).unsqueeze(-1)).view(out, inn).to(torch.float32)
    check(torch.equal(deq[~tie], ref[~tie]), "FP4 rounding check failed")
    return packed, s, deq


def dequant_fp4(packed, s):
    out, half = packed.shape
    b = packed.view(torch.uint8).to(torch.int64)
    nib = torch.stack([b & 15, b >> 4], dim=-1).view(out, half * 2)
    table = torch.tensor(E2M1_VALUES + [-x for x in E2M1_VALUES], dtype=torch.float64)
    e = s.view(torch.uint8).to(torch.int64) - 127
    scale = torch.pow(2.0, e.to(torch.float64)).repeat_interleave(FP4_GROUP, 1)
    return (table[nib] * scale).to(torch.float32)


# ----------------------------------------------------------------------------------------------
# safetensors I/O (own writer/reader so every dtype name is exactly the official one)
# ----------------------------------------------------------------------------------------------

ST_DTYPES = {
    torch.float32: "F32", torch.bfloat16: "BF16", torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e8m0fnu: "F8_E8M0", torch.int8: "I8", torch.int64: "I64", torch.int32: "I32",
}
ST_TORCH = {v: k for k, v in ST_DTYPES.items()}


def write_safetensors(path, tensors):
    header, blobs, off = {"__metadata__": {"format": "pt"}}, [], 0
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        buf = torch.frombuffer(bytearray(data[base + a : base + b]), dtype=torch.uint8)
        out[name] = (info["dtype"], buf.view(ST_TORCH[info["dtype"]]).reshape(info["shape"]))
    return out


# ----------------------------------------------------------------------------------------------
# Random official checkpoint
# ----------------------------------------------------------------------------------------------


def tensor_plan(cfg):
    """(name, fmt, shape, init, fan_in) for every tensor of the official checkpoint (no .scale)."""
    D, m = cfg.D, cfg.m
    plan = []

    def add(name, fmt, shape, init, fan_in=1):
        plan.append((name, fmt, tuple(shape), init, fan_in))

    def linear(name, out, inn, fmt):
        add(name + ".weight", fmt, (out, inn), "dense", inn)

    def hyper(prefix, mix, scales):
        add(prefix + "_fn", "f32", (mix, m * D), "hc_fn", m * D)
        add(prefix + "_base", "f32", (mix,), "hc_base")
        add(prefix + "_scale", "f32", (scales,), "hc_scale")

    def compressor(prefix, ratio, hd):
        c = 2 if ratio == cfg.csa else 1
        add(prefix + ".ape", "f32", (ratio, c * hd), "ape")
        linear(prefix + ".wkv", c * hd, D, "bf16")
        linear(prefix + ".wgate", c * hd, D, "bf16")
        add(prefix + ".norm.weight", "bf16", (hd,), "norm")

    def block(p, layer):
        add(p + ".attn_norm.weight", "bf16", (D,), "norm")
        add(p + ".ffn_norm.weight", "bf16", (D,), "norm")
        hyper(p + ".hc_attn", (2 + m) * m, 3)
        hyper(p + ".hc_ffn", (2 + m) * m, 3)
        a = p + ".attn"
        linear(a + ".wq_a", cfg.Rq, D, "fp8")
        add(a + ".q_norm.weight", "bf16", (cfg.Rq,), "norm")
        linear(a + ".wq_b", cfg.H * cfg.hd, cfg.Rq, "fp8")
        linear(a + ".wkv", cfg.hd, D, "fp8")
        add(a + ".kv_norm.weight", "bf16", (cfg.hd,), "norm")
        linear(a + ".wo_a", cfg.G * cfg.Ro, cfg.H * cfg.hd // cfg.G, "fp8")
        linear(a + ".wo_b", D, cfg.G * cfg.Ro, "fp8")
        add(a + ".attn_sink", "f32", (cfg.H,), "sink")
        r = cfg.ratios[layer]
        if r:
            compressor(a + ".compressor", r, cfg.hd)
            if r == cfg.csa:
                linear(a + ".indexer.wq_b", cfg.Hi * cfg.di, cfg.Rq, "fp8")
                linear(a + ".indexer.weights_proj", cfg.Hi, D, "bf16")
                compressor(a + ".indexer.compressor", r, cfg.di)
        f = p + ".ffn"
        linear(f + ".gate", cfg.E, D, "bf16")
        if layer < cfg.n_hash:
            add(f + ".gate.tid2eid", "i64", (cfg.V, cfg.K), "tid2eid")
        else:
            add(f + ".gate.bias", "f32", (cfg.E,), "router_bias")
        efmt = "fp4" if cfg.fp4_experts else "fp8"
        for e in range(cfg.E):
            linear(f"{f}.experts.{e}.w1", cfg.I, D, efmt)
            linear(f"{f}.experts.{e}.w2", D, cfg.I, efmt)
            linear(f"{f}.experts.{e}.w3", cfg.I, D, efmt)
        linear(f + ".shared_experts.w1", cfg.I, D, "fp8")
        linear(f + ".shared_experts.w2", D, cfg.I, "fp8")
        linear(f + ".shared_experts.w3", cfg.I, D, "fp8")

    add("embed.weight", "bf16", (cfg.V, D), "embed")
    for layer in range(cfg.L):
        block(f"layers.{layer}", layer)
    add("norm.weight", "bf16", (D,), "norm")
    hyper("hc_head", m, 1)
    linear("head", cfg.V, D, "bf16")
    for i in range(cfg.n_mtp):
        p = f"mtp.{i}"
        block(p, cfg.L + i)
        linear(p + ".e_proj", D, D, "fp8")
        linear(p + ".h_proj", D, D, "fp8")
        for n in ("enorm", "hnorm", "norm"):
            add(f"{p}.{n}.weight", "bf16", (D,), "norm")
        hyper(p + ".hc_head", m, 1)
    return plan


def random_values(gen, shape, init, fan_in, cfg):
    n = lambda: torch.randn(shape, generator=gen, dtype=torch.float32)
    if init == "dense" or init == "hc_fn":
        return n() / math.sqrt(fan_in)
    if init == "embed":
        return n()
    if init == "norm":
        return 1.0 + 0.25 * n()
    if init == "sink":
        return n()
    if init == "router_bias":
        return 0.3 * n()
    if init == "ape":
        return 0.5 * n()
    if init == "hc_base":
        return 0.5 * n()
    if init == "hc_scale":
        return 0.5 + torch.rand(shape, generator=gen, dtype=torch.float32)
    if init == "tid2eid":
        rows = [torch.randperm(cfg.E, generator=gen)[: cfg.K] for _ in range(shape[0])]
        return torch.stack(rows).to(torch.int64)
    raise GoldenError(init)


def make_checkpoint(cfg, seed):
    """Returns (stored: official name -> tensor as written, deq: official name -> float32/int64 value
    used by both sides; no .scale entries)."""
    gen = torch.Generator().manual_seed(seed)
    stored, deq = {}, {}
    for name, fmt, shape, init, fan_in in tensor_plan(cfg):
        v = random_values(gen, shape, init, fan_in, cfg)
        if fmt in ("fp8", "fp4"):
            # vary the magnitude per 128x128 block (and per 1x32 group for FP4) so that the block
            # scales differ and a mis-indexed / transposed scale lookup changes the result
            out, inn = shape
            blk = torch.pow(2.0, torch.rand(-(-out // FP8_BLOCK), -(-inn // FP8_BLOCK), generator=gen) * 3 - 1.5)
            v = v * blk.repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)[:out, :inn]
            if fmt == "fp4":
                grp = torch.pow(2.0, torch.rand(out, inn // FP4_GROUP, generator=gen) * 2 - 1)
                v = v * grp.repeat_interleave(FP4_GROUP, 1)
        base = name[: -len(".weight")] if name.endswith(".weight") else None
        if fmt == "fp8":
            q, s, d = quant_fp8(v)
            stored[name], stored[base + ".scale"], deq[name] = q, s, d
        elif fmt == "fp4":
            q, s, d = quant_fp4(v)
            stored[name], stored[base + ".scale"], deq[name] = q, s, d
        elif fmt == "bf16":
            b = v.to(torch.bfloat16)
            stored[name], deq[name] = b, b.to(torch.float32)
        elif fmt == "f32":
            stored[name], deq[name] = v, v.clone()
        elif fmt == "i64":
            stored[name], deq[name] = v, v.clone()
        else:
            raise GoldenError(fmt)
    return stored, deq


def dequant_stored(stored_read):
    """From what was read back from disk: official name -> dequantised tensor (no .scale)."""
    out = {}
    for name, (dt, t) in stored_read.items():
        if name.endswith(".scale"):
            continue
        if dt == "F8_E4M3":
            out[name] = dequant_fp8(t, stored_read[name[: -len(".weight")] + ".scale"][1])
        elif dt == "I8":
            out[name] = dequant_fp4(t, stored_read[name[: -len(".weight")] + ".scale"][1])
        elif dt == "BF16":
            out[name] = t.to(torch.float32)
        else:
            out[name] = t.clone()
    return out


# ----------------------------------------------------------------------------------------------
# Official -> transformers names (written independently; cross-checked against transformers'
# own conversion mapping by from_pretrained below)
# ----------------------------------------------------------------------------------------------

LAYER_MAP = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "hc_attn_fn": "attn_hc.fn", "hc_attn_base": "attn_hc.base", "hc_attn_scale": "attn_hc.scale",
    "hc_ffn_fn": "ffn_hc.fn", "hc_ffn_base": "ffn_hc.base", "hc_ffn_scale": "ffn_hc.scale",
    "attn.attn_sink": "self_attn.sinks",
    "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.q_norm.weight": "self_attn.q_a_norm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv.weight": "self_attn.kv_proj.weight",
    "attn.kv_norm.weight": "self_attn.kv_norm.weight",
    "attn.wo_a.weight": "self_attn.o_a_proj.weight",
    "attn.wo_b.weight": "self_attn.o_b_proj.weight",
    "attn.compressor.wkv.weight": "self_attn.compressor.kv_proj.weight",
    "attn.compressor.wgate.weight": "self_attn.compressor.gate_proj.weight",
    "attn.compressor.ape": "self_attn.compressor.position_bias",
    "attn.compressor.norm.weight": "self_attn.compressor.kv_norm.weight",
    "attn.indexer.wq_b.weight": "self_attn.compressor.indexer.q_b_proj.weight",
    "attn.indexer.weights_proj.weight": "self_attn.compressor.indexer.scorer.weights_proj.weight",
    "attn.indexer.compressor.wkv.weight": "self_attn.compressor.indexer.kv_proj.weight",
    "attn.indexer.compressor.wgate.weight": "self_attn.compressor.indexer.gate_proj.weight",
    "attn.indexer.compressor.ape": "self_attn.compressor.indexer.position_bias",
    "attn.indexer.compressor.norm.weight": "self_attn.compressor.indexer.kv_norm.weight",
    "ffn.gate.weight": "mlp.gate.weight",
    "ffn.gate.bias": "mlp.gate.e_score_correction_bias",
    "ffn.gate.tid2eid": "mlp.gate.tid2eid",
    "ffn.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
    "ffn.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
}
GLOBAL_MAP = {
    "embed.weight": "model.embed_tokens.weight", "head.weight": "lm_head.weight", "norm.weight": "model.norm.weight",
    "hc_head_fn": "model.hc_head.hc_fn", "hc_head_base": "model.hc_head.hc_base", "hc_head_scale": "model.hc_head.hc_scale",
}


def block_to_hf(deq, prefix, cfg):
    """Official block tensors under `prefix.` -> transformers DeepseekV4DecoderLayer state dict."""
    out = {}
    for suffix, hf in LAYER_MAP.items():
        if f"{prefix}.{suffix}" in deq:
            out[hf] = deq[f"{prefix}.{suffix}"]
    f = f"{prefix}.ffn.experts"
    out["mlp.experts.gate_up_proj"] = torch.stack(
        [torch.cat([deq[f"{f}.{e}.w1.weight"], deq[f"{f}.{e}.w3.weight"]], dim=0) for e in range(cfg.E)])
    out["mlp.experts.down_proj"] = torch.stack([deq[f"{f}.{e}.w2.weight"] for e in range(cfg.E)])
    return out


def official_to_hf(deq, cfg):
    sd = {hf: deq[o] for o, hf in GLOBAL_MAP.items()}
    for layer in range(cfg.L):
        for k, v in block_to_hf(deq, f"layers.{layer}", cfg).items():
            sd[f"model.layers.{layer}.{k}"] = v
    n_official = sum(1 for k in deq if not k.startswith("mtp."))
    n_used = len(GLOBAL_MAP) + sum(
        1 for k in deq if k.startswith("layers.") and (".experts." in k or re.sub(r"^layers\.\d+\.", "", k) in LAYER_MAP))
    check(n_official == n_used, f"official->HF mapping left {n_official - n_used} tensors unmapped")
    return sd


# ----------------------------------------------------------------------------------------------
# transformers model
# ----------------------------------------------------------------------------------------------


def import_hf():
    import transformers
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM
    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as mod
    return transformers, DeepseekV4Config, DeepseekV4ForCausalLM, mod


def check_hf_config(hf_model, hfc, cfg, mod):
    check(list(hfc.layer_types) == cfg.layer_types(), f"layer_types {hfc.layer_types} != {cfg.layer_types()}")
    want_rates = {"compressed_sparse_attention": cfg.csa, "heavily_compressed_attention": cfg.hca}
    check(dict(hfc.compress_rates) == want_rates, f"compress_rates {hfc.compress_rates} != {want_rates}")
    want_mlp = ["hash_moe" if i < cfg.n_hash else "moe" for i in range(cfg.L)]
    check(list(hfc.mlp_layer_types) == want_mlp, f"mlp_layer_types {hfc.mlp_layer_types} != {want_mlp}")
    check(hfc.qk_rope_head_dim == cfg.rd, f"qk_rope_head_dim {hfc.qk_rope_head_dim} != {cfg.rd}")
    for key, want in (("sliding_window", cfg.window), ("index_topk", cfg.topk), ("index_n_heads", cfg.Hi),
                      ("index_head_dim", cfg.di), ("hc_mult", cfg.m), ("num_experts_per_tok", cfg.K),
                      ("n_routed_experts", cfg.E)):
        check(getattr(hfc, key) == want, f"{key}: {getattr(hfc, key)} != {want}")
    rot = hf_model.model.rotary_emb
    yarn = None
    if cfg.yarn:
        rs = cfg.rope_scaling
        yarn = (rs["factor"], rs["original_max_position_embeddings"], rs.get("beta_fast", 32), rs.get("beta_slow", 1))
    want_main = official_inv_freq(cfg.rd, cfg.rope_theta)
    want_comp = official_inv_freq(cfg.rd, cfg.compress_rope_theta, yarn)
    got_main = rot.main_inv_freq.float().cpu()
    got_comp = rot.compress_inv_freq.float().cpu()
    report = {
        "main_inv_freq_max_rel_err": float(((got_main - want_main).abs() / want_main).max()),
        "compress_inv_freq_max_rel_err": float(((got_comp - want_comp).abs() / want_comp).max()),
        "main_attention_scaling": float(rot.main_attention_scaling),
        "compress_attention_scaling": float(rot.compress_attention_scaling),
        "rope_parameters": hfc.rope_parameters,
    }
    log("rope check:", json.dumps(report, default=str))
    check(report["main_inv_freq_max_rel_err"] < 1e-6, f"main RoPE frequencies differ from official: {got_main} vs {want_main}")
    check(report["compress_inv_freq_max_rel_err"] < 1e-6,
          f"compress RoPE (YaRN) frequencies differ from official: {got_comp} vs {want_comp}. transformers derives the "
          "YaRN factor as max_position_embeddings / original_max_position_embeddings; make them consistent with "
          "rope_scaling.factor")
    check(report["main_attention_scaling"] == 1.0 and report["compress_attention_scaling"] == 1.0,
          "RoPE attention scaling must be 1 (no YaRN mscale)")
    # every HF layer built the expected modules
    for i, layer in enumerate(hf_model.model.layers):
        kind = cfg.kind(i)
        comp = layer.self_attn.compressor
        want_cls = {"sliding_attention": type(None), "compressed_sparse_attention": mod.DeepseekV4CSACompressor,
                    "heavily_compressed_attention": mod.DeepseekV4HCACompressor}[kind]
        check(type(comp) is want_cls, f"layer {i}: compressor {type(comp)} != {want_cls}")
        check(layer.mlp.is_hash == (i < cfg.n_hash), f"layer {i}: hash routing mismatch")
    return report


def make_hf_config(d):
    """DeepseekV4Config from a config dict; drops keys the strict config class rejects (logged)."""
    _, DeepseekV4Config, _, _ = import_hf()
    d = dict(d)
    dropped = []
    for _ in range(len(d)):
        try:
            return DeepseekV4Config.from_dict(d), dropped
        except TypeError as e:
            m = re.search(r"'(\w+)'", str(e))
            if not m or m.group(1) not in d:
                raise
            dropped.append(m.group(1))
            log(f"note: DeepseekV4Config rejects key {m.group(1)!r}: {e}")
            d.pop(m.group(1))
    raise GoldenError("cannot build DeepseekV4Config")


def verify_state(model, deq, cfg):
    want = official_to_hf(deq, cfg)
    got = model.state_dict()
    check(set(want) == set(got), f"state dict key sets differ: only ours {sorted(set(want) - set(got))[:10]}, "
          f"only HF {sorted(set(got) - set(want))[:10]}")
    for k, v in want.items():
        g = got[k]
        check(g.shape == v.shape, f"{k}: shape {tuple(g.shape)} != {tuple(v.shape)}")
        if v.dtype == torch.int64:
            check(torch.equal(g.to(torch.int64), v), f"{k}: value mismatch")
        else:
            check(g.dtype == torch.float32, f"{k}: dtype {g.dtype}")
            check(torch.equal(g, v), f"{k}: value mismatch (max {float((g - v).abs().max())})")
    check(model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr(), "lm_head tied to embed")
    return len(want)


def load_hf_model(stored_cfg, deq, cfg, tmp):
    """Loads the dequantised checkpoint (official names) through transformers' own conversion
    mapping (from_pretrained). If that path loses or misplaces tensors the problem is reported
    loudly and recorded, and the model is instead filled with load_state_dict(strict=True) under
    our independent name mapping. Either way every tensor is compared with the checkpoint."""
    transformers, DeepseekV4Config, DeepseekV4ForCausalLM, mod = import_hf()
    hf_cfg, dropped = make_hf_config(hf_config_dict(stored_cfg))
    d = os.path.join(tmp, "hf_f32")
    os.makedirs(d, exist_ok=True)
    cfg_d = {k: v for k, v in hf_config_dict(stored_cfg).items() if k not in dropped}
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg_d, f, indent=2)
    write_safetensors(os.path.join(d, "model.safetensors"), {k: v.contiguous() for k, v in deq.items()})
    report = {"dropped_config_keys": dropped}
    model = None
    try:
        model, info = DeepseekV4ForCausalLM.from_pretrained(d, dtype=torch.float32, output_loading_info=True)
        info = {k: sorted(map(str, v)) if v is not None else [] for k, v in info.items()}
        report["from_pretrained"] = info
        log("from_pretrained loading info:", json.dumps({k: v[:20] for k, v in info.items()}))
        problems = []
        if info.get("missing_keys"):
            problems.append(f"MISSING keys (randomly initialised!): {info['missing_keys']}")
        unexpected = [k for k in info.get("unexpected_keys", []) if not re.search(r"(^|\.)mtp\.", k)]
        if unexpected:
            problems.append(f"UNEXPECTED keys (not mapped!): {unexpected}")
        if info.get("mismatched_keys"):
            problems.append(f"MISMATCHED keys: {info['mismatched_keys']}")
        if info.get("error_msgs"):
            problems.append(f"load errors: {info['error_msgs']}")
        if not problems:
            try:
                n = verify_state(model, deq, cfg)
                log(f"from_pretrained (transformers conversion mapping): all {n} tensors identical to the checkpoint")
            except GoldenError as e:
                problems.append(f"value check after from_pretrained: {e}")
        if problems:
            report["from_pretrained_problems"] = problems
            log("!" * 100)
            log("!! transformers from_pretrained of the official names is BROKEN:\n!!   " + "\n!!   ".join(problems))
            log("!! falling back to load_state_dict(strict=True) with our own name mapping")
            log("!" * 100)
            model = None
    except Exception as e:  # noqa: BLE001
        report["from_pretrained_exception"] = repr(e)
        log(f"!! from_pretrained raised {e!r}; falling back to load_state_dict(strict=True)")
        model = None
    if model is None:
        model = DeepseekV4ForCausalLM(hf_cfg).to(torch.float32)
        res = model.load_state_dict(official_to_hf(deq, cfg), strict=True)
        check(not res.missing_keys and not res.unexpected_keys, f"strict load: {res}")
        n = verify_state(model, deq, cfg)
        report["loaded_with"] = "load_state_dict(strict=True), own mapping"
        log(f"load_state_dict(strict=True): all {n} tensors identical to the checkpoint")
    else:
        report["loaded_with"] = "from_pretrained (transformers conversion mapping of the official names)"
    model.eval()
    force_eager(model)
    return model, mod, report


def force_eager(model):
    """Eager attention and the eager per-expert loop (DeepseekV4Experts.forward): the code paths
    read for docs/TESTING.md; the grouped_mm experts backend also rejects float64."""
    try:
        model.set_experts_implementation("eager")
    except Exception as e:  # noqa: BLE001
        log(f"note: set_experts_implementation failed: {e!r}")
        model.config._experts_implementation = "eager"
    check(getattr(model.config, "_experts_implementation", None) == "eager", "experts implementation is not eager")
    check(getattr(model.config, "_attn_implementation", None) in (None, "eager"),
          f"attention implementation {model.config._attn_implementation}")


# ----------------------------------------------------------------------------------------------
# MTP (official MTPBlock wiring around transformers' decoder layer)
# ----------------------------------------------------------------------------------------------


class MTPRef:
    def __init__(self, hf_model, stored_cfg, deq, cfg, dtype):
        transformers, DeepseekV4Config, _, mod = import_hf()
        d = hf_config_dict(stored_cfg)
        d["num_hidden_layers"] = cfg.L + 1
        d["layer_types"] = cfg.layer_types() + [cfg.kind(cfg.L)]
        d["mlp_layer_types"] = ["hash_moe" if i < cfg.n_hash else "moe" for i in range(cfg.L + 1)]
        self.hfc, _ = make_hf_config(d)
        for attr in ("_attn_implementation", "_experts_implementation"):
            try:
                setattr(self.hfc, attr, "eager")
            except Exception as e:  # noqa: BLE001
                log(f"note: cannot set {attr} on the MTP config: {e!r}")
        check(self.hfc.layer_types[cfg.L] == cfg.kind(cfg.L), "MTP layer type")
        check(self.hfc.mlp_layer_types[cfg.L] == "moe", "MTP must use learned routing")
        self.layer = mod.DeepseekV4DecoderLayer(self.hfc, cfg.L)
        sd = block_to_hf(deq, "mtp.0", cfg)
        missing, unexpected = self.layer.load_state_dict(sd, strict=False)
        check(not missing and not unexpected, f"MTP layer load: missing {missing} unexpected {unexpected}")
        self.layer.eval().to(dtype)
        D = cfg.D
        self.e_proj = deq["mtp.0.e_proj.weight"].to(dtype)
        self.h_proj = deq["mtp.0.h_proj.weight"].to(dtype)
        eps = self.hfc.rms_norm_eps
        self.enorm = mod.DeepseekV4RMSNorm(D, eps)
        self.hnorm = mod.DeepseekV4RMSNorm(D, eps)
        self.norm = mod.DeepseekV4RMSNorm(D, eps)
        for n in ("enorm", "hnorm", "norm"):
            getattr(self, n).weight.data.copy_(deq[f"mtp.0.{n}.weight"])
            getattr(self, n).to(dtype)
        self.hc_head = mod.DeepseekV4HyperHead(self.hfc)
        self.hc_head.hc_fn.data.copy_(deq["mtp.0.hc_head_fn"])
        self.hc_head.hc_base.data.copy_(deq["mtp.0.hc_head_base"])
        self.hc_head.hc_scale.data.copy_(deq["mtp.0.hc_head_scale"])
        self.hc_head.to(dtype)
        self.hf = hf_model
        self.cfg = cfg
        self.dtype = dtype
        self.mod = mod
        self.kind = cfg.kind(cfg.L)

    def inputs(self, streams, next_tokens):
        """streams [1, S, m, D] main final streams; next_tokens [1, S] -> MTP block input [1, S, m, D]."""
        e = self.hf.model.embed_tokens(next_tokens)
        e = F.linear(self.enorm(e), self.e_proj)
        h = F.linear(self.hnorm(streams), self.h_proj)
        return e.unsqueeze(2) + h

    def head(self, x):
        return self.hf.lm_head(self.norm(self.hc_head(x)))

    def pos_emb(self, x, pos):
        rot = self.hf.model.rotary_emb
        return {"main": rot(x, position_ids=pos, layer_type="main"), "compress": rot(x, position_ids=pos, layer_type="compress")}

    @torch.no_grad()
    def prefill(self, streams, next_tokens):
        S = next_tokens.shape[1]
        x = self.inputs(streams, next_tokens)
        pos = torch.arange(S).unsqueeze(0)
        q = torch.arange(S).view(S, 1)
        k = torch.arange(S).view(1, S)
        allowed = (k <= q) & (k > q - self.cfg.window)
        mask = torch.zeros(1, 1, S, S, dtype=self.dtype).masked_fill(~allowed, float("-inf"))
        y = self.layer(x, input_ids=next_tokens, position_embeddings=self.pos_emb(x, pos), position_ids=pos,
                       attention_mask=mask, past_key_values=None)
        return self.head(y)[0]

    @torch.no_grad()
    def decode(self, streams, next_tokens):
        from transformers.cache_utils import DynamicCache
        cache = DynamicCache(config=self.hfc)
        rows = []
        for t in range(next_tokens.shape[1]):
            x = self.inputs(streams[:, t : t + 1], next_tokens[:, t : t + 1])
            pos = torch.tensor([[t]])
            mask = None if self.kind == "sliding_attention" else torch.zeros(
                1, 1, 1, min(t + 1, self.cfg.window), dtype=self.dtype)
            y = self.layer(x, input_ids=next_tokens[:, t : t + 1], position_embeddings=self.pos_emb(x, pos),
                           position_ids=pos, attention_mask=mask, past_key_values=cache)
            rows.append(self.head(y)[0])
        return torch.cat(rows, 0)


# ----------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------


class Margins:
    """Smallest gap at the top-k boundary of the indexer (CSA) and the learned routers during a
    prefill: how far the fixture is from a tie (a tie would make the choice arbitrary)."""

    def __init__(self, model, cfg, mod):
        self.cfg = cfg
        self.idx = []  # (abs gap, gap relative to max |score|)
        self.router = []
        self.handles = []
        for m in model.modules():
            if isinstance(m, mod.DeepseekV4IndexerScorer):
                self.handles.append(m.register_forward_hook(self._idx))
            if isinstance(m, mod.DeepseekV4TopKRouter):
                self.handles.append(m.register_forward_hook(self._router))

    def _idx(self, module, args, out):
        s = out[0].double()  # [S, Tc], prefill: query t at row t
        for t in range(s.shape[0]):
            usable = (t + 1) // self.cfg.csa
            if usable > self.cfg.topk:
                v = s[t, :usable].sort(descending=True).values
                gap = float(v[self.cfg.topk - 1] - v[self.cfg.topk])
                self.idx.append((gap, gap / max(float(v.abs().max()), 1e-30)))

    def _router(self, module, args, out):
        logits = out[0].double()
        s = module.score_fn(logits) + module.e_score_correction_bias.double()
        v = s.sort(dim=-1, descending=True).values
        gap = (v[:, module.top_k - 1] - v[:, module.top_k])
        for g in gap.tolist():
            self.router.append((g, g))

    def summary(self):
        def mn(xs):
            return None if not xs else {"min_gap": min(x[0] for x in xs), "min_rel_gap": min(x[1] for x in xs), "count": len(xs)}
        return {"indexer_topk": mn(self.idx), "router_topk": mn(self.router)}

    def remove(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def prefill(model, ids):
    """One-shot prefill without cache. Returns logits [T, V] and every layer's output streams."""
    layers = []
    hs = [l.register_forward_hook(lambda m, a, o: layers.append(o)) for l in model.model.layers]
    try:
        out = model(input_ids=ids, use_cache=False)
    finally:
        for h in hs:
            h.remove()
    return out.logits[0], layers


@torch.no_grad()
def cached_decode(model, ids, n_prefill=0, mask_mode="none"):
    T = ids.shape[1]
    past, rows = None, []

    def kw(t0, t1):
        d = dict(use_cache=True, position_ids=torch.arange(t0, t1).unsqueeze(0))
        if mask_mode == "ones":
            d["attention_mask"] = torch.ones(1, t1, dtype=torch.long)
        return d

    if n_prefill:
        out = model(input_ids=ids[:, :n_prefill], **kw(0, n_prefill))
        past = out.past_key_values
        rows.append(out.logits[0])
    for t in range(n_prefill, T):
        out = model(input_ids=ids[:, t : t + 1], past_key_values=past, **kw(t, t + 1))
        past = out.past_key_values
        rows.append(out.logits[0])
    return torch.cat(rows, 0)


def maxdiff(a, b):
    return float((a.double() - b.double()).abs().max())


def run_dtype(model32, stored_cfg, deq, cfg, mod, dtype, cases, rel_tol, want_margins):
    model = model32 if dtype == torch.float32 else copy.deepcopy(model32).to(dtype)
    model.eval()
    force_eager(model)
    mtp = MTPRef(model, stored_cfg, deq, cfg, dtype) if cfg.n_mtp else None
    results = {}
    for case in cases:
        ids = torch.tensor([case["tokens"]], dtype=torch.long)
        T = ids.shape[1]
        margins = Margins(model, cfg, mod) if want_margins else None
        if margins and mtp:
            margins.handles.append(mtp.layer.mlp.gate.register_forward_hook(margins._router))
        t0 = time.time()
        logits, layer_streams = prefill(model, ids)
        streams = layer_streams[-1]
        mtp_logits = mtp.prefill(streams[:, : T - 1], ids[:, 1:]) if (mtp and T > 1) else None
        if margins:
            margins.remove()
        scale = float(logits.abs().max())
        tol = rel_tol * scale
        dec = cached_decode(model, ids)
        d_dec = maxdiff(dec, logits)
        r = {"logits": logits, "mtp": mtp_logits, "scale": scale, "tol": tol, "decode_diff": d_dec,
             "layers": torch.stack([x[0] for x in layer_streams])}
        if d_dec > tol:
            dec1 = cached_decode(model, ids, mask_mode="ones")
            log(f"  !! decode mismatch {d_dec:.3e} > {tol:.3e}; with an explicit all-ones attention_mask: "
                f"{maxdiff(dec1, logits):.3e}; per-position max diff: "
                f"{[round(float(x), 6) for x in (dec.double() - logits.double()).abs().amax(-1)]}")
            raise GoldenError(f"{case['name']} ({dtype}): transformers prefill and cached decode disagree "
                              f"(max abs diff {d_dec:.3e} > {tol:.3e}); this config/prompt is unusable")
        if T >= 4:
            P = T // 2 + 1
            ch = cached_decode(model, ids, n_prefill=P)
            r["chunked_diff"] = maxdiff(ch, logits)
            r["chunked_prefill_len"] = P
            check(r["chunked_diff"] <= tol, f"{case['name']}: prefill({P}) + decode != prefill: {r['chunked_diff']:.3e}")
        if mtp_logits is not None:
            md = mtp.decode(streams[:, : T - 1], ids[:, 1:])
            r["mtp_decode_diff"] = maxdiff(md, mtp_logits)
            r["mtp_scale"] = float(mtp_logits.abs().max())
            r["mtp_tol"] = rel_tol * r["mtp_scale"]
            check(r["mtp_decode_diff"] <= rel_tol * r["mtp_scale"],
                  f"{case['name']}: MTP prefill vs cached decode {r['mtp_decode_diff']:.3e}")
        if margins:
            r["margins"] = margins.summary()
        log(f"  {case['name']} [{str(dtype)[6:]}] T={T} |logits|max={scale:.3f} std={float(logits.std()):.3f} "
            f"prefill-vs-decode={d_dec:.2e} chunked={r.get('chunked_diff', 0):.2e} "
            f"mtp-decode={r.get('mtp_decode_diff', 0):.2e} ({time.time() - t0:.1f}s)")
        results[case["name"]] = r
    return results


# ----------------------------------------------------------------------------------------------
# Diagnostics (printed, not asserted): how transformers treats config variants
# ----------------------------------------------------------------------------------------------


def diagnostics(stored_cfg, cfg):
    transformers, DeepseekV4Config, _, mod = import_hf()
    rep = {}
    try:
        d = hf_config_dict(stored_cfg)
        d["rope_scaling"] = {k: v for k, v in d["rope_scaling"].items() if k != "rope_type"}
        c, _ = make_hf_config(d)
        rot = mod.DeepseekV4RotaryEmbedding(c)
        rep["rope_scaling_with_only_type_key"] = {"compress": c.rope_parameters.get("compress"),
                                                  "compress_inv_freq": rot.compress_inv_freq.tolist()}
    except Exception as e:  # noqa: BLE001
        rep["rope_scaling_with_only_type_key"] = repr(e)
    try:
        d = hf_config_dict(stored_cfg)
        d.pop("layer_types")
        c, _ = make_hf_config(d)
        rep["without_layer_types"] = {"layer_types": c.layer_types, "compress_rates": c.compress_rates}
    except Exception as e:  # noqa: BLE001
        rep["without_layer_types"] = repr(e)
    try:
        d = hf_config_dict(stored_cfg)
        d["max_position_embeddings"] = 4096
        c, _ = make_hf_config(d)
        rot = mod.DeepseekV4RotaryEmbedding(c)
        rs = cfg.rope_scaling
        want = official_inv_freq(cfg.rd, cfg.compress_rope_theta,
                                 (rs["factor"], rs["original_max_position_embeddings"], rs.get("beta_fast", 32), rs.get("beta_slow", 1))) if cfg.yarn else None
        rep["max_position_embeddings_4096"] = {
            "compress_inv_freq": rot.compress_inv_freq.tolist(),
            "official_inv_freq": want.tolist() if want is not None else None}
    except Exception as e:  # noqa: BLE001
        rep["max_position_embeddings_4096"] = repr(e)
    log("diagnostics:", json.dumps(rep, default=str))
    return rep


# ----------------------------------------------------------------------------------------------


def short_path(a):
    if not os.path.exists(a):
        return a
    r = os.path.relpath(a)
    return a if r.startswith("..") else r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="official-layout config JSON")
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--out", required=True, help="output directory (created; existing files overwritten)")
    ap.add_argument("--lengths", default="7,40,80", help="comma-separated prompt lengths")
    ap.add_argument("--ref-dtype", default="float64", choices=["float64", "float32"],
                    help="dtype of the stored reference run (float32 is always run and compared too)")
    ap.add_argument("--rel-tol", type=float, default=1e-4,
                    help="max |prefill - cached decode| relative to max |logit|")
    ap.add_argument("--fp32-fp64-rel-tol", type=float, default=1e-3,
                    help="max |float32 run - float64 run| relative to max |logit| (tie sensitivity)")
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--dump-layers", action="store_true",
                    help="also write <case>.layers.npy: float32 [L, T, hc_mult, hidden], every main layer's "
                         "output streams in the reference prefill (debugging aid; not committed)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    transformers, _, _, _ = import_hf()
    log(f"transformers {transformers.__version__}, torch {torch.__version__}, config {args.config}, seed {args.seed}")
    with open(args.config) as f:
        cfg_json = json.load(f)
    cfg = Cfg(cfg_json)
    check(cfg.n_mtp <= 1, "the MTP reference supports one MTP block")
    lengths = [int(x) for x in args.lengths.split(",")]
    Tmax = max(lengths)
    coverage = {
        "longest": Tmax, "sliding_window": cfg.window, "exceeds_window": Tmax > cfg.window,
        "csa_ratio": cfg.csa, "csa_entries": Tmax // cfg.csa, "index_topk": cfg.topk,
        "exceeds_index_topk": Tmax // cfg.csa > cfg.topk, "hca_ratio": cfg.hca, "hca_entries": Tmax // cfg.hca,
    }
    has_csa = any(cfg.kind(i) == "compressed_sparse_attention" for i in range(cfg.L))
    has_hca = any(cfg.kind(i) == "heavily_compressed_attention" for i in range(cfg.L))
    check(coverage["exceeds_window"], f"longest prompt must exceed the window: {coverage}")
    check(not has_csa or coverage["exceeds_index_topk"], f"longest prompt must give > index_topk CSA entries: {coverage}")
    check(not has_hca or coverage["hca_entries"] >= 2, f"longest prompt must cover >= 2 HCA windows: {coverage}")
    check(cfg.Hi >= 16, "use >= 16 index heads (ReLU-sum scores tie with few heads)")

    out_dir = args.out
    os.makedirs(out_dir, exist_ok=True)
    stored_cfg = stored_config(cfg_json, cfg)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(stored_cfg, f, indent=2, sort_keys=True)
        f.write("\n")

    stored, deq = make_checkpoint(cfg, args.seed)
    ckpt = os.path.join(out_dir, "model.safetensors")
    write_safetensors(ckpt, stored)
    back = read_safetensors(ckpt)
    check(set(back) == set(stored), "safetensors round trip: names")
    for k, (dt, t) in back.items():
        check(dt == ST_DTYPES[stored[k].dtype] and tuple(t.shape) == tuple(stored[k].shape), f"{k}: round trip")
    deq_disk = dequant_stored(back)
    try:  # torch's own E8M0 -> float conversion must agree with 2^(byte-127)
        sc = torch.cat([t.reshape(-1) for k, (dt, t) in back.items() if dt == "F8_E8M0"])
        ours = torch.pow(2.0, sc.view(torch.uint8).to(torch.float64) - 127)
        check(torch.equal(sc.to(torch.float32).double(), ours), "E8M0 decoding disagrees with torch")
        log(f"E8M0 scales: exponent range [{int(sc.view(torch.uint8).min()) - 127}, {int(sc.view(torch.uint8).max()) - 127}], "
            "torch's float8_e8m0fnu conversion agrees")
    except GoldenError:
        raise
    except Exception as e:  # noqa: BLE001
        log(f"note: torch cannot convert float8_e8m0fnu: {e!r}")
    check(set(deq_disk) == set(deq), "dequantised key sets")
    for k in deq:
        check(torch.equal(deq_disk[k], deq[k]), f"{k}: dequantised from disk != in memory")
    try:  # the reference safetensors library must read it too
        from safetensors import safe_open
        with safe_open(ckpt, "pt") as f:
            n = 0
            for k in f.keys():
                n += 1
                t = f.get_tensor(k)
                check(t.dtype == stored[k].dtype and torch.equal(t.view(torch.uint8), stored[k].contiguous().view(torch.uint8)),
                      f"safetensors lib reads {k} differently")
        log(f"safetensors library reads all {n} tensors identically")
    except GoldenError:
        raise
    except Exception as e:  # noqa: BLE001
        log(f"note: safetensors library could not read the file: {e!r}")
    dtype_count = {}
    for t in stored.values():
        dtype_count[ST_DTYPES[t.dtype]] = dtype_count.get(ST_DTYPES[t.dtype], 0) + 1
    log(f"checkpoint: {len(stored)} tensors {dtype_count}, {os.path.getsize(ckpt) / 2**20:.2f} MiB")

    diag = diagnostics(stored_cfg, cfg)
    tmp = tempfile.mkdtemp(prefix="golden_")
    try:
        model32, mod, load_info = load_hf_model(stored_cfg, deq, cfg, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rope_report = check_hf_config(model32, model32.config, cfg, mod)

    rng = np.random.default_rng(args.seed * 1000003 + 17)
    cases = [{"name": f"len{T}", "tokens": [int(x) for x in rng.integers(0, cfg.V, size=T)]} for T in lengths]
    ref = torch.float64 if args.ref_dtype == "float64" else torch.float32
    log("float32 run:")
    r32 = run_dtype(model32, stored_cfg, deq, cfg, mod, torch.float32, cases, args.rel_tol, ref == torch.float32)
    r64 = None
    if ref == torch.float64:
        log("float64 run:")
        r64 = run_dtype(model32, stored_cfg, deq, cfg, mod, torch.float64, cases, args.rel_tol, True)
    rref = r64 if r64 is not None else r32

    out_cases = []
    for case in cases:
        n = case["name"]
        a = rref[n]
        entry = {"name": n, "tokens": case["tokens"], "length": len(case["tokens"]),
                 "logits": f"{n}.logits.npy", "logits_shape": list(a["logits"].shape),
                 "logit_max_abs": a["scale"], "logit_std": float(a["logits"].double().std()),
                 "asserted_rel_tol": args.rel_tol,
                 "asserted_abs_tol": a["tol"],
                 "prefill_vs_cached_decode_max_abs_diff": {"float32": r32[n]["decode_diff"]},
                 "prefill_vs_chunked_max_abs_diff": {"float32": r32[n].get("chunked_diff")},
                 "chunked_prefill_len": r32[n].get("chunked_prefill_len"),
                 "topk_margins": a.get("margins")}
        np.save(os.path.join(out_dir, f"{n}.logits.npy"), a["logits"].float().numpy().astype("<f4"))
        if args.dump_layers:
            entry["layers"] = f"{n}.layers.npy"
            np.save(os.path.join(out_dir, f"{n}.layers.npy"), a["layers"].float().numpy().astype("<f4"))
        if a["mtp"] is not None:
            entry["mtp"] = f"{n}.mtp.npy"
            entry["mtp_shape"] = list(a["mtp"].shape)
            entry["mtp_max_abs"] = a["mtp_scale"]
            entry["mtp_asserted_abs_tol"] = a["mtp_tol"]
            entry["mtp_prefill_vs_cached_decode_max_abs_diff"] = {"float32": r32[n]["mtp_decode_diff"]}
            np.save(os.path.join(out_dir, f"{n}.mtp.npy"), a["mtp"].float().numpy().astype("<f4"))
        if r64 is not None:
            b = r64[n]
            entry["prefill_vs_cached_decode_max_abs_diff"]["float64"] = b["decode_diff"]
            entry["prefill_vs_chunked_max_abs_diff"]["float64"] = b.get("chunked_diff")
            d_l = maxdiff(r32[n]["logits"], b["logits"])
            entry["float32_vs_float64_max_abs_diff"] = {"logits": d_l}
            check(d_l <= args.fp32_fp64_rel_tol * b["scale"],
                  f"{n}: float32 and float64 transformers runs differ by {d_l:.3e} (> {args.fp32_fp64_rel_tol} x "
                  f"{b['scale']:.3f}): a discrete top-k choice is near a tie; this config/prompt is unusable")
            if b["mtp"] is not None:
                entry["mtp_prefill_vs_cached_decode_max_abs_diff"]["float64"] = b["mtp_decode_diff"]
                d_m = maxdiff(r32[n]["mtp"], b["mtp"])
                entry["float32_vs_float64_max_abs_diff"]["mtp"] = d_m
                check(d_m <= args.fp32_fp64_rel_tol * b["mtp_scale"], f"{n}: float32 vs float64 MTP differ by {d_m:.3e}")
        out_cases.append(entry)

    meta = {
        "generator": "scripts/golden/make_golden.py",
        "command": " ".join(["python"] + [short_path(a) for a in sys.argv]),
        "config_source": short_path(args.config),
        "seed": args.seed,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "reference": f"transformers DeepseekV4ForCausalLM (eager), {args.ref_dtype} run stored as float32; "
                     "MTP: transformers DeepseekV4DecoderLayer + official MTPBlock wiring",
        "mtp_alignment": "row t: main final streams at position t + embed(tokens[t+1]), MTP RoPE position t, "
                         "MTP sliding window over MTP positions 0..t",
        "coverage": coverage,
        "rope_check": {k: v for k, v in rope_report.items() if k != "rope_parameters"},
        "hf_rope_parameters": rope_report["rope_parameters"],
        "checkpoint_tensors": len(stored),
        "checkpoint_dtypes": dtype_count,
        "hf_loading_info": load_info,
        "diagnostics": diag,
        "cases": out_cases,
    }
    with open(os.path.join(out_dir, "cases.json"), "w") as f:
        json.dump(meta, f, indent=1, default=str)
        f.write("\n")
    total = sum(os.path.getsize(os.path.join(out_dir, x)) for x in os.listdir(out_dir))
    log(f"wrote {out_dir}: {total / 2**20:.2f} MiB")


if __name__ == "__main__":
    try:
        main()
    except GoldenError as e:
        print(f"GOLDEN CHECK FAILED: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
