#!/usr/bin/env python3
"""Trains the dsv4 demo model: a small DeepSeek-V4 (sliding window, CSA with the Lightning Indexer,
HCA, mHC, hash-routed and score-routed MoE, attention sinks, one MTP block) on the Brown corpus,
and exports it in the official checkpoint layout (FP8 E4M3 weights with 128x128 UE8M0 scales, FP4
E2M1 experts with 1x32 UE8M0 scales, BF16 / F32 / I64 tensors, config.json, tokenizer.json).

The model is written here in plain PyTorch from docs/MODEL.md (Phase 2); it is bound to the
engine by scripts/demo/check_export.py (this forward vs `dsv4 logits` on an exported checkpoint).
Training is quantisation-aware: after --qat-start of the steps, every weight is used in the forward
pass exactly as it will be stored (FP8 / FP4 / BF16 rounding with a straight-through gradient),
so the export is the trained model, not an approximation of it.

Recipe choices that the references do not fix (docs/DEMO_MODEL.md):
  * Lightning Indexer: trained only by KL(main attention || indexer) over the usable compressed
    entries (main attention probabilities over all usable entries, summed over heads, detached;
    the indexer's inputs are detached so this loss trains nothing else). The main attention uses
    the indexer's top-k from the first step, as at inference.
  * Routing: hash layers use a fixed random tid2eid (num_experts_per_tok distinct experts per token
    id); score-routed layers balance load without an auxiliary loss: after every step the
    selection bias of expert e moves by --bias-rate * sign(mean load - load_e).
  * MTP: loss weight --mtp-weight on cross entropy of x_{t+2} from (main streams at t, x_{t+1}).

Inputs: --data DIR with tokenizer.json and {train,valid,test,chat}.ids.npy (uint16 token ids, made
by scripts/demo/encode.sh). Outputs under --out: the checkpoint directory model/, train.log,
report.json (losses, perplexities, MTP agreement, routing statistics).
"""
import argparse
import json
import math
import os
import shutil
import struct
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# Official number formats (docs/MODEL.md 1b): values exactly as the checkpoint will hold them
# ----------------------------------------------------------------------------------------------

E4M3_MAX, E2M1_MAX = 448.0, 6.0


def pow2_exp(amax, qmax):
    """Smallest integer e with amax / 2^e <= qmax (0 where amax == 0): the UE8M0 scale exponent."""
    m, ex = torch.frexp(amax / qmax)
    e = torch.where(m == 0.5, ex - 1, ex)
    e = torch.where(amax > 0, e, torch.zeros_like(e))
    return e.clamp(-127, 127)


def pow2(e):
    return torch.pow(torch.full_like(e, 2.0, dtype=torch.float32), e.to(torch.float32))


def round_e4m3(v):
    """Round to the nearest E4M3 value (ties to even mantissa); |v| is clamped to 448."""
    a = v.abs().clamp(max=E4M3_MAX)
    _, ex = torch.frexp(a)
    step = pow2((ex - 1).clamp(min=-6) - 3)
    return torch.sign(v) * torch.round(a / step) * step


def round_e2m1(v):
    """Round to the nearest E2M1 value {0, .5, 1, 1.5, 2, 3, 4, 6} (ties to the even code)."""
    a = v.abs().clamp(max=E2M1_MAX)
    _, ex = torch.frexp(a)
    step = pow2((ex - 1).clamp(min=0, max=2) - 1)
    return torch.sign(v) * (torch.round(a / step) * step).clamp(max=E2M1_MAX)


def quant_fp8(w):
    """[..., out, in] -> (dequantised values, scale exponents [..., ceil(out/128), ceil(in/128)])."""
    *b, o, i = w.shape
    so, si = -(-o // 128), -(-i // 128)
    pad = F.pad(w, (0, si * 128 - i, 0, so * 128 - o))
    blk = pad.reshape(*b, so, 128, si, 128)
    e = pow2_exp(blk.abs().amax(dim=(-3, -1), keepdim=True), E4M3_MAX)
    s = pow2(e)
    q = (round_e4m3(blk / s) * s).reshape(*b, so * 128, si * 128)[..., :o, :i]
    return q, e.reshape(*b, so, si)


def quant_fp4(w):
    """[..., out, in] (in % 32 == 0) -> (dequantised values, scale exponents [..., out, in/32])."""
    *b, o, i = w.shape
    g = w.reshape(*b, o, i // 32, 32)
    e = pow2_exp(g.abs().amax(-1, keepdim=True), E2M1_MAX)
    s = pow2(e)
    return (round_e2m1(g / s) * s).reshape(*b, o, i), e.squeeze(-1)


def quant_bf16(w):
    return w.to(torch.bfloat16).to(torch.float32)


QUANT = {"fp8": lambda w: quant_fp8(w)[0], "fp4": lambda w: quant_fp4(w)[0], "bf16": quant_bf16, "f32": lambda w: w}


def ste(w, fmt, on):
    if not on or fmt == "f32":
        return w
    return w + (QUANT[fmt](w) - w).detach()


# ----------------------------------------------------------------------------------------------
# Model (official tensor names; docs/MODEL.md Phase 2)
# ----------------------------------------------------------------------------------------------


def rms(x, w=None, eps=1e-6):
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if w is None else y * w


def inv_freq(rd, base, yarn):
    f = 1.0 / (base ** (torch.arange(0, rd, 2, dtype=torch.float32) / rd))
    if yarn is not None:
        factor, orig, beta_fast, beta_slow = yarn

        def corr(n):
            return rd * math.log(orig / (n * 2 * math.pi)) / (2 * math.log(base))

        lo, hi = max(math.floor(corr(beta_fast)), 0), min(math.ceil(corr(beta_slow)), rd - 1)
        if lo == hi:
            hi += 0.001
        ramp = torch.clamp((torch.arange(rd // 2, dtype=torch.float32) - lo) / (hi - lo), 0, 1)
        f = f / factor * ramp + f * (1 - ramp)
    return f


def rope(x, pos, freqs, inverse=False, heads=False):
    """Interleaved-pair rotation of x [B, T, rd] (or [B, T, heads, rd]) at positions pos [T]."""
    th = pos.to(torch.float32)[:, None] * freqs[None, :]
    cos, sin = torch.cos(th), torch.sin(th)
    if heads:
        cos, sin = cos[:, None, :], sin[:, None, :]
    if inverse:
        sin = -sin
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1).flatten(-2)


class Cfg:
    def __init__(self, j):
        self.j = j
        self.V, self.D, self.L = j["vocab_size"], j["hidden_size"], j["num_hidden_layers"]
        self.H, self.hd, self.rd = j["num_attention_heads"], j["head_dim"], j["qk_rope_head_dim"]
        self.Rq, self.Ro, self.G = j["q_lora_rank"], j["o_lora_rank"], j["o_groups"]
        self.I, self.E, self.K = j["moe_intermediate_size"], j["n_routed_experts"], j["num_experts_per_tok"]
        self.n_hash, self.W = j["num_hash_layers"], j["sliding_window"]
        self.Hi, self.di, self.topk = j["index_n_heads"], j["index_head_dim"], j["index_topk"]
        self.m, self.iters, self.hc_eps = j["hc_mult"], j["hc_sinkhorn_iters"], j["hc_eps"]
        self.eps, self.scale, self.limit = j["rms_norm_eps"], j["routed_scaling_factor"], j["swiglu_limit"]
        self.n_mtp = j["num_nextn_predict_layers"]
        self.ratios = [0 if r <= 1 else r for r in j["compress_ratios"]]
        rs = j["rope_scaling"]
        yarn = (rs["factor"], rs["original_max_position_embeddings"], rs["beta_fast"], rs["beta_slow"])
        self.f_main = inv_freq(self.rd, j["rope_theta"], None)
        self.f_comp = inv_freq(self.rd, j["compress_rope_theta"], yarn)
        assert j["scoring_func"] == "sqrtsoftplus" and j["expert_dtype"] == "fp4" and j["n_shared_experts"] == 1


class P(nn.Module):
    """Holds parameters under their official names with their storage format."""

    def __init__(self):
        super().__init__()
        self.fmt = {}

    def add(self, name, shape, fmt, init, std=0.02):
        t = torch.empty(shape)
        if init == "normal":
            nn.init.normal_(t, 0.0, std)
        elif init == "ones":
            t.fill_(1.0)
        else:
            t.zero_()
        self.register_parameter(name, nn.Parameter(t))
        self.fmt[name] = fmt

    def w(self, name, qat):
        return ste(getattr(self, name), self.fmt[name], qat)


class Linear(P):
    def __init__(self, out, inn, fmt, std=0.02):
        super().__init__()
        self.add("weight", (out, inn), fmt, "normal", std)

    def forward(self, x, qat):
        return x @ self.w("weight", qat).t()


class Norm(P):
    def __init__(self, d):
        super().__init__()
        self.add("weight", (d,), "bf16", "ones")

    def forward(self, x, qat, eps):
        return rms(x, self.w("weight", qat), eps)


class Compressor(P):
    def __init__(self, cfg, ratio, d):
        super().__init__()
        self.r, self.d, self.c = ratio, d, (2 if ratio == 4 else 1)
        self.add("ape", (ratio, self.c * d), "f32", "zeros")
        self.wkv = Linear(self.c * d, cfg.D, "bf16")
        self.wgate = Linear(self.c * d, cfg.D, "bf16")
        self.norm = Norm(d)

    def forward(self, a, cfg, qat):
        B, T, _ = a.shape
        r, d, n = self.r, self.d, T // self.r
        kv = self.wkv(a[:, : n * r], qat).view(B, n, r, self.c * d)
        g = self.wgate(a[:, : n * r], qat).view(B, n, r, self.c * d) + self.ape
        if self.c == 2:  # entry j pools the A halves of window j-1 and the B halves of window j
            pk = torch.cat([torch.zeros_like(kv[:, :1, :, :d]), kv[:, :-1, :, :d]], 1)
            pg = torch.cat([torch.full_like(g[:, :1, :, :d], float("-inf")), g[:, :-1, :, :d]], 1)
            kv, g = torch.cat([pk, kv[..., d:]], 2), torch.cat([pg, g[..., d:]], 2)
        e = (torch.softmax(g, dim=2) * kv).sum(2)
        e = self.norm(e, qat, cfg.eps)
        pos = torch.arange(n, device=a.device) * r
        return torch.cat([e[..., : d - cfg.rd], rope(e[..., d - cfg.rd:], pos, cfg.f_comp.to(a.device))], -1)


class Indexer(P):
    def __init__(self, cfg):
        super().__init__()
        self.wq_b = Linear(cfg.Hi * cfg.di, cfg.Rq, "fp8")
        self.weights_proj = Linear(cfg.Hi, cfg.D, "bf16")
        self.compressor = Compressor(cfg, 4, cfg.di)

    def forward(self, a, cq, pos, cfg, qat):
        """Scores I[b, t, j] over the compressed entries (inputs detached by the caller)."""
        B, T, _ = a.shape
        k = self.compressor(a, cfg, qat)  # [B, Nc, di]
        q = self.wq_b(cq, qat).view(B, T, cfg.Hi, cfg.di)
        q = torch.cat([q[..., : cfg.di - cfg.rd], rope(q[..., cfg.di - cfg.rd:], pos, cfg.f_comp.to(a.device), heads=True)], -1)
        w = self.weights_proj(a, qat) * cfg.Hi ** -0.5
        s = torch.relu(torch.einsum("bthd,bjd->bthj", q, k)) * cfg.di ** -0.5
        return (s * w[..., None]).sum(2)


class Attention(P):
    def __init__(self, cfg, ratio):
        super().__init__()
        self.ratio = ratio
        out_std = 0.02 / math.sqrt(2 * (cfg.L + cfg.n_mtp))
        self.add("attn_sink", (cfg.H,), "f32", "zeros")
        self.wq_a = Linear(cfg.Rq, cfg.D, "fp8")
        self.q_norm = Norm(cfg.Rq)
        self.wq_b = Linear(cfg.H * cfg.hd, cfg.Rq, "fp8")
        self.wkv = Linear(cfg.hd, cfg.D, "fp8")
        self.kv_norm = Norm(cfg.hd)
        self.wo_a = Linear(cfg.G * cfg.Ro, cfg.H * cfg.hd // cfg.G, "fp8")
        self.wo_b = Linear(cfg.D, cfg.G * cfg.Ro, "fp8", out_std)
        if ratio:
            self.compressor = Compressor(cfg, ratio, cfg.hd)
            if ratio == 4:
                self.indexer = Indexer(cfg)

    def forward(self, a, cfg, qat, stats):
        B, T, _ = a.shape
        H, hd, rd = cfg.H, cfg.hd, cfg.rd
        nd = hd - rd
        dev = a.device
        pos = torch.arange(T, device=dev)
        freqs = (cfg.f_comp if self.ratio else cfg.f_main).to(dev)
        cq = self.q_norm(self.wq_a(a, qat), qat, cfg.eps)
        q = self.wq_b(cq, qat).view(B, T, H, hd)
        q = rms(q, None, cfg.eps)
        q = torch.cat([q[..., :nd], rope(q[..., nd:], pos, freqs, heads=True)], -1)
        k = self.kv_norm(self.wkv(a, qat), qat, cfg.eps)
        k = torch.cat([k[..., :nd], rope(k[..., nd:], pos, freqs)], -1)
        scale = hd ** -0.5
        t_idx = pos[:, None]
        win = (pos[None, :] <= t_idx) & (pos[None, :] > t_idx - cfg.W)
        sw = torch.einsum("bthd,bsd->bhts", q, k) * scale
        sw = sw.masked_fill(~win, float("-inf"))
        parts, vals = [sw], [k]
        if self.ratio:
            comp = self.compressor(a, cfg, qat)  # [B, Nc, hd]
            n = comp.shape[1]
            usable = torch.arange(n, device=dev)[None, :] < ((pos + 1) // self.ratio)[:, None]  # [T, Nc]
            sc = torch.einsum("bthd,bjd->bhtj", q, comp) * scale
            allowed = usable[None, None]
            if self.ratio == 4:
                isc = self.indexer(a.detach(), cq.detach(), pos, cfg, qat)  # [B, T, Nc]
                masked = isc.masked_fill(~usable[None], -1e30)
                kk = min(cfg.topk, n)
                top = masked.topk(kk, dim=-1).indices
                sel = torch.zeros_like(masked, dtype=torch.bool).scatter_(-1, top, True) & usable[None]
                allowed = sel[:, None]
                if stats is not None and self.training:
                    with torch.no_grad():  # target: main attention over all usable entries
                        tgt = torch.softmax(sc.detach().masked_fill(~usable[None, None], float("-inf")), -1)
                        tgt = torch.nan_to_num(tgt, nan=0.0).mean(1)  # [B, T, Nc]
                    rows = usable.any(-1)
                    logp = torch.log_softmax(masked, -1)
                    kl = (tgt * (torch.log(tgt.clamp_min(1e-30)) - logp.masked_fill(~usable[None], 0.0))).sum(-1)
                    stats["indexer_kl"].append(kl[:, rows].mean())
            parts.append(sc.masked_fill(~allowed, float("-inf")))
            vals.append(comp)
        parts.append(self.attn_sink.view(1, H, 1, 1).expand(B, H, T, 1))
        p = torch.softmax(torch.cat(parts, -1), -1)
        o = torch.einsum("bhts,bsd->bthd", p[..., :T], k)
        if self.ratio:
            o = o + torch.einsum("bhtj,bjd->bthd", p[..., T:-1], vals[1])
        o = torch.cat([o[..., :nd], rope(o[..., nd:], pos, freqs, inverse=True, heads=True)], -1)
        G = cfg.G
        og = o.reshape(B, T, G, H // G * hd)
        wo_a = self.wo_a.w("weight", qat).view(G, cfg.Ro, H // G * hd)
        z = torch.einsum("btgi,goi->btgo", og, wo_a).reshape(B, T, G * cfg.Ro)
        return self.wo_b(z, qat)


class Expert(P):
    def __init__(self, cfg, fmt, out_std):
        super().__init__()
        self.w1 = Linear(cfg.I, cfg.D, fmt)
        self.w2 = Linear(cfg.D, cfg.I, fmt, out_std)
        self.w3 = Linear(cfg.I, cfg.D, fmt)

    def forward(self, x, cfg, qat):
        g = self.w1(x, qat).clamp(max=cfg.limit)
        u = self.w3(x, qat).clamp(-cfg.limit, cfg.limit)
        return self.w2(F.silu(g) * u, qat)


class Gate(P):
    def __init__(self, cfg, layer, gen):
        super().__init__()
        self.add("weight", (cfg.E, cfg.D), "bf16", "normal")
        self.hash = layer < cfg.n_hash
        if self.hash:
            t = torch.stack([torch.randperm(cfg.E, generator=gen)[: cfg.K] for _ in range(cfg.V)])
            self.register_buffer("tid2eid", t.to(torch.int64))
        else:
            self.register_buffer("bias", torch.zeros(cfg.E))


class MoE(P):
    def __init__(self, cfg, layer, gen):
        super().__init__()
        out_std = 0.02 / math.sqrt(2 * (cfg.L + cfg.n_mtp))
        self.gate = Gate(cfg, layer, gen)
        self.experts = nn.ModuleList([Expert(cfg, "fp4", out_std) for _ in range(cfg.E)])
        self.shared_experts = Expert(cfg, "fp8", out_std)

    def forward(self, f, ids, cfg, qat, stats, name):
        B, T, D = f.shape
        x = f.reshape(-1, D)
        s = torch.sqrt(F.softplus(x @ self.gate.w("weight", qat).t()))  # [N, E]
        if self.gate.hash:
            idx = self.gate.tid2eid[ids.reshape(-1)]
        else:
            idx = (s + self.gate.bias).topk(cfg.K, dim=-1).indices
        g = s.gather(1, idx)
        g = g / g.sum(-1, keepdim=True) * cfg.scale
        comb = torch.zeros_like(s).scatter(1, idx, g)  # [N, E]
        w1 = ste(torch.stack([e.w1.weight for e in self.experts]), "fp4", qat)
        w3 = ste(torch.stack([e.w3.weight for e in self.experts]), "fp4", qat)
        w2 = ste(torch.stack([e.w2.weight for e in self.experts]), "fp4", qat)
        h = F.silu(torch.einsum("nd,eid->eni", x, w1).clamp(max=cfg.limit)) * \
            torch.einsum("nd,eid->eni", x, w3).clamp(-cfg.limit, cfg.limit)
        y = torch.einsum("ne,end->nd", comb, torch.einsum("eni,edi->end", h, w2))
        y = y + self.shared_experts(x, cfg, qat)
        if stats is not None:
            stats["load"][name] = torch.bincount(idx.reshape(-1), minlength=cfg.E).detach()
        return y.view(B, T, D)


class Block(P):
    def __init__(self, cfg, layer, gen):
        super().__init__()
        m, D = cfg.m, cfg.D
        self.layer = layer
        self.attn_norm = Norm(D)
        self.ffn_norm = Norm(D)
        for h in ("hc_attn", "hc_ffn"):
            self.add(h + "_fn", ((2 + m) * m, m * D), "f32", "normal", 0.01)
            self.add(h + "_base", ((2 + m) * m,), "f32", "zeros")
            self.add(h + "_scale", (3,), "f32", "ones")
        self.attn = Attention(cfg, cfg.ratios[layer])
        self.ffn = MoE(cfg, layer, gen)

    def hc_pre(self, X, h, cfg):
        m = cfg.m
        fn, base, sc = getattr(self, h + "_fn"), getattr(self, h + "_base"), getattr(self, h + "_scale")
        xf = X.flatten(-2)
        mu = (xf @ fn.t()) * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + cfg.eps)
        pre = torch.sigmoid(sc[0] * mu[..., :m] + base[:m]) + cfg.hc_eps
        post = 2 * torch.sigmoid(sc[1] * mu[..., m: 2 * m] + base[m: 2 * m])
        c = (sc[2] * mu[..., 2 * m:] + base[2 * m:]).unflatten(-1, (m, m))
        c = torch.softmax(c, -1) + cfg.hc_eps
        c = c / (c.sum(-2, keepdim=True) + cfg.hc_eps)
        for _ in range(cfg.iters - 1):
            c = c / (c.sum(-1, keepdim=True) + cfg.hc_eps)
            c = c / (c.sum(-2, keepdim=True) + cfg.hc_eps)
        u = (pre[..., None] * X).sum(-2)
        return post, c, u

    def forward(self, X, ids, cfg, qat, stats, drop, name):
        post, c, u = self.hc_pre(X, "hc_attn", cfg)
        y = F.dropout(self.attn(self.attn_norm(u, qat, cfg.eps), cfg, qat, stats), drop, self.training)
        X = post[..., None] * y[..., None, :] + torch.einsum("btjk,btjd->btkd", c, X)
        post, c, u = self.hc_pre(X, "hc_ffn", cfg)
        y = F.dropout(self.ffn(self.ffn_norm(u, qat, cfg.eps), ids, cfg, qat, stats, name), drop, self.training)
        return post[..., None] * y[..., None, :] + torch.einsum("btjk,btjd->btkd", c, X)


def hc_head(X, fn, base, sc, cfg):
    xf = X.flatten(-2)
    mu = (xf @ fn.t()) * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + cfg.eps)
    pre = torch.sigmoid(sc[0] * mu + base) + cfg.hc_eps
    return (pre[..., None] * X).sum(-2)


class MTPBlock(Block):
    def __init__(self, cfg, layer, gen):
        super().__init__(cfg, layer, gen)
        self.e_proj = Linear(cfg.D, cfg.D, "fp8")
        self.h_proj = Linear(cfg.D, cfg.D, "fp8")
        self.enorm, self.hnorm, self.norm = Norm(cfg.D), Norm(cfg.D), Norm(cfg.D)
        self.add("hc_head_fn", (cfg.m, cfg.m * cfg.D), "f32", "normal", 0.01)
        self.add("hc_head_base", (cfg.m,), "f32", "zeros")
        self.add("hc_head_scale", (1,), "f32", "ones")


class Model(P):
    def __init__(self, cfg, seed):
        super().__init__()
        gen = torch.Generator().manual_seed(seed + 1)
        self.cfg = cfg
        self.embed = nn.Module()
        self.embed.weight = nn.Parameter(torch.randn(cfg.V, cfg.D) * 0.02)
        self.layers = nn.ModuleList([Block(cfg, i, gen) for i in range(cfg.L)])
        self.norm = Norm(cfg.D)
        self.add("hc_head_fn", (cfg.m, cfg.m * cfg.D), "f32", "normal", 0.01)
        self.add("hc_head_base", (cfg.m,), "f32", "zeros")
        self.add("hc_head_scale", (1,), "f32", "ones")
        self.head = Linear(cfg.V, cfg.D, "bf16")
        self.mtp = nn.ModuleList([MTPBlock(cfg, cfg.L + i, gen) for i in range(cfg.n_mtp)])

    def emb(self, ids, qat):
        return F.embedding(ids, ste(self.embed.weight, "bf16", qat))

    def forward(self, ids, qat, stats=None, drop=0.0, mtp=True):
        """ids [B, T] -> (main logits [B, T, V], MTP logits [B, T-1, V] or None)."""
        cfg = self.cfg
        X = self.emb(ids, qat)[:, :, None, :].expand(-1, -1, cfg.m, -1)
        X = F.dropout(X, drop, self.training)
        for i, layer in enumerate(self.layers):
            X = layer(X, ids, cfg, qat, stats, drop, f"layers.{i}")
        u = hc_head(X, self.hc_head_fn, self.hc_head_base, self.hc_head_scale, cfg)
        logits = self.head(self.norm(u, qat, cfg.eps), qat)
        mtp_logits = None
        if mtp and self.mtp:
            b = self.mtp[0]
            e = b.enorm(self.emb(ids[:, 1:], qat), qat, cfg.eps)
            h = b.hnorm(X[:, :-1], qat, cfg.eps)
            Y = b.e_proj(e, qat)[:, :, None, :] + b.h_proj(h, qat)
            Y = b(Y, ids[:, 1:], cfg, qat, stats, drop, "mtp.0")
            u = hc_head(Y, b.hc_head_fn, b.hc_head_base, b.hc_head_scale, cfg)
            mtp_logits = self.head(b.norm(u, qat, cfg.eps), qat)
        return logits, mtp_logits

    def formats(self):
        """official name -> storage format, for every parameter and buffer."""
        out = {}
        for mname, mod in self.named_modules():
            pre = mname + "." if mname else ""
            for pname in mod._parameters:
                out[pre + pname] = getattr(mod, "fmt", {}).get(pname, "bf16")  # embed.weight: bf16
            for bname in mod._buffers:
                out[pre + bname] = "i64" if bname == "tid2eid" else "f32"
        return out


# ----------------------------------------------------------------------------------------------
# Export (official layout)
# ----------------------------------------------------------------------------------------------


def e4m3_codes(x):
    """Exact E4M3 values (numpy float32) -> uint8 codes."""
    a = np.abs(x).astype(np.float64)
    m, ex = np.frexp(a)
    E = ex - 1 + 7
    mant = np.where(E >= 1, np.round((a / np.ldexp(1.0, ex - 1) - 1.0) * 8), np.round(a / 2.0 ** -9))
    code = np.where(E >= 1, (E.clip(0, 15) << 3) | mant.astype(np.int64), mant.astype(np.int64))
    code = np.where(a == 0, 0, code) | (np.signbit(x) & (a != 0)).astype(np.int64) << 7
    return code.astype(np.uint8)


def e4m3_decode(c):
    c = c.astype(np.int64)
    s, E, M = c >> 7, (c >> 3) & 15, c & 7
    v = np.where(E == 0, M * 2.0 ** -9, (1 + M / 8.0) * np.ldexp(1.0, E - 7))
    return np.where(s == 1, -v, v)


E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def e2m1_codes(x):
    a = np.abs(x)
    lut = {int(2 * v): i for i, v in enumerate(E2M1)}
    table = np.full(13, -1, np.int64)
    for k, i in lut.items():
        table[k] = i
    code = table[(2 * a).astype(np.int64)]
    assert (code >= 0).all() and np.array_equal(np.array(E2M1)[code], a), "value not on the E2M1 grid"
    return code | ((x < 0) & (code > 0)).astype(np.int64) << 3


def read_checkpoint(path):
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8: 8 + n])
    raw = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        raw[name] = (info["dtype"], info["shape"], np.frombuffer(data[8 + n + a: 8 + n + b], np.uint8))
    out = {}
    for name, (dt, shape, buf) in raw.items():
        if name.endswith(".scale"):
            continue
        if dt == "F8_E4M3":
            s = raw[name[: -len(".weight")] + ".scale"]
            e = s[2].astype(np.int64).reshape(s[1]) - 127
            full = np.repeat(np.repeat(np.ldexp(1.0, e), 128, 0), 128, 1)[: shape[0], : shape[1]]
            v = e4m3_decode(buf.reshape(shape)) * full
        elif dt == "I8":
            s = raw[name[: -len(".weight")] + ".scale"]
            e = s[2].astype(np.int64).reshape(s[1]) - 127
            b = buf.reshape(shape).astype(np.int64)
            nib = np.stack([b & 15, b >> 4], -1).reshape(shape[0], shape[1] * 2)
            table = np.array(E2M1 + [-x for x in E2M1])
            v = table[nib] * np.repeat(np.ldexp(1.0, e), 32, 1)
        elif dt == "BF16":
            v = (buf.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
        elif dt == "F32":
            v = buf.view("<f4").reshape(shape)
        elif dt == "I64":
            out[name] = torch.from_numpy(buf.view("<i8").reshape(shape).copy())
            continue
        else:
            raise SystemExit(f"{name}: unexpected dtype {dt}")
        out[name] = torch.from_numpy(np.asarray(v, np.float32).copy())
    return out, {k: v[0] for k, v in raw.items()}


def bf16_bytes(t):
    return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def export(model, cfg_json, tokenizer_path, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    fmts = model.formats()
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    tensors = {}  # name -> (dtype name, shape, bytes)
    for name, t in sd.items():
        fmt = fmts[name]
        if fmt == "fp8":
            q, e = quant_fp8(t)
            full = np.repeat(np.repeat(np.ldexp(1.0, e.numpy().astype(np.int64)), 128, 0), 128, 1)[: t.shape[0], : t.shape[1]]
            codes = e4m3_codes(q.numpy().astype(np.float64) / full)
            assert np.array_equal(e4m3_decode(codes) * full, q.numpy().astype(np.float64)), name
            tensors[name] = ("F8_E4M3", list(t.shape), codes.tobytes())
            tensors[name[: -len(".weight")] + ".scale"] = ("F8_E8M0", list(e.shape), (e.numpy() + 127).astype(np.uint8).tobytes())
        elif fmt == "fp4":
            q, e = quant_fp4(t)
            s = np.repeat(np.ldexp(1.0, e.numpy().astype(np.int64)), 32, 1)
            codes = e2m1_codes((q.numpy().astype(np.float64) / s))
            packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
            tensors[name] = ("I8", [t.shape[0], t.shape[1] // 2], packed.tobytes())
            tensors[name[: -len(".weight")] + ".scale"] = ("F8_E8M0", list(e.shape), (e.numpy() + 127).astype(np.uint8).tobytes())
        elif fmt == "bf16":
            tensors[name] = ("BF16", list(t.shape), bf16_bytes(t).tobytes())
        elif fmt == "i64":
            tensors[name] = ("I64", list(t.shape), sd[name].to(torch.int64).numpy().astype("<i8").tobytes())
        else:
            tensors[name] = ("F32", list(t.shape), t.numpy().astype("<f4").tobytes())
    header, off = {"__metadata__": {"format": "pt", "producer": "scripts/demo/train.py"}}, 0
    for name in sorted(tensors):
        dt, shape, raw = tensors[name]
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(raw)]}
        off += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(os.path.join(out_dir, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for name in sorted(tensors):
            f.write(tensors[name][2])
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg_json, f, indent=2)
        f.write("\n")
    shutil.copy(tokenizer_path, os.path.join(out_dir, "tokenizer.json"))
    return len(tensors)


# ----------------------------------------------------------------------------------------------
# Config of the demo model
# ----------------------------------------------------------------------------------------------


def demo_config(vocab, small=False):
    c = {
        "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
        "vocab_size": vocab, "hidden_size": 256, "num_hidden_layers": 4,
        "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 64, "qk_rope_head_dim": 16,
        "q_lora_rank": 128, "o_lora_rank": 64, "o_groups": 4,
        "moe_intermediate_size": 128, "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2,
        "num_hash_layers": 1, "scoring_func": "sqrtsoftplus", "norm_topk_prob": True, "routed_scaling_factor": 1.5,
        "swiglu_limit": 10.0, "sliding_window": 64,
        # layer 0 sliding (hash routed), 1 CSA, 2 HCA (ratio 32), 3 CSA; MTP block sliding
        "compress_ratios": [0, 4, 32, 4, 0],
        "index_n_heads": 16, "index_head_dim": 32, "index_topk": 32,
        "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "compress_rope_theta": 160000.0,
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                         "beta_fast": 32, "beta_slow": 1},
        "max_position_embeddings": 4096, "num_nextn_predict_layers": 1,
        "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "expert_dtype": "fp4",
        "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
    }
    if small:  # the local smoke test
        c.update({"hidden_size": 64, "num_attention_heads": 2, "head_dim": 32, "q_lora_rank": 32,
                  "o_lora_rank": 16, "o_groups": 2, "moe_intermediate_size": 32, "n_routed_experts": 4,
                  "sliding_window": 8, "compress_ratios": [0, 4, 8, 4, 0], "index_topk": 4, "index_head_dim": 16})
    hca = [r for r in c["compress_ratios"][: c["num_hidden_layers"]] if r > 4]
    c["layer_types"] = ["sliding_attention" if r == 0 else "compressed_sparse_attention" if r == 4
                        else "heavily_compressed_attention" for r in c["compress_ratios"][: c["num_hidden_layers"]]]
    c["compress_rates"] = {"compressed_sparse_attention": 4, "heavily_compressed_attention": hca[0] if hca else 128}
    return c


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def segments(ids, T, bos):
    """Held-out evaluation: consecutive pieces of T-1 tokens, each after a BOS (what dsv4 perplexity does)."""
    n = (len(ids)) // (T - 1)
    x = ids[: n * (T - 1)].reshape(n, T - 1)
    return np.concatenate([np.full((n, 1), bos, x.dtype), x], 1)


@torch.no_grad()
def evaluate(model, segs, bs, dev, full=False):
    model.eval()
    cfg = model.cfg
    nll = n = 0.0
    mtp_agree = mtp_n = mtp_nll = 0.0
    load = {}
    for i in range(0, len(segs), bs):
        x = torch.from_numpy(segs[i: i + bs].astype(np.int64)).to(dev)
        stats = {"load": {}, "indexer_kl": []}
        logits, ml = model(x, qat=True, stats=stats, mtp=full)
        lp = torch.log_softmax(logits.float(), -1)
        nll += -lp[:, :-1].gather(-1, x[:, 1:, None]).sum().item()
        n += x[:, 1:].numel()
        if full:
            main_next = logits[:, 1:].argmax(-1)  # main model's prediction of x_{t+2}
            agree = (ml[:, :-1].argmax(-1) == main_next[:, :-1])  # MTP at t drafts x_{t+2}
            mtp_agree += agree.sum().item()
            mtp_n += agree.numel()
            mlp = torch.log_softmax(ml[:, :-1].float(), -1)
            mtp_nll += -mlp.gather(-1, x[:, 2:, None]).sum().item()
            for k, v in stats["load"].items():
                load[k] = load.get(k, 0) + v.cpu().numpy()
    model.train()
    out = {"ppl": math.exp(nll / n), "tokens": int(n)}
    if full:
        out["mtp_top1_agreement"] = mtp_agree / mtp_n
        out["mtp_ppl_x_t_plus_2"] = math.exp(mtp_nll / mtp_n)
        out["tokens_per_expert"] = {k: [int(c) for c in v] for k, v in load.items()}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--steps", type=int, default=0, help="0: as many as fit in --time-budget (measured)")
    ap.add_argument("--time-budget", type=float, default=360.0, help="seconds of training when --steps is 0")
    ap.add_argument("--max-steps", type=int, default=2500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--dropout", type=float, default=0.2)
    ap.add_argument("--mtp-weight", type=float, default=0.3)
    ap.add_argument("--indexer-weight", type=float, default=1.0)
    ap.add_argument("--bias-rate", type=float, default=1e-3)
    ap.add_argument("--chat-frac", type=float, default=0.1)
    ap.add_argument("--qat-start", type=float, default=0.2, help="fraction of steps before QAT is on")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--save-state", action="store_true", help="also write state.pt (float32 parameters)")
    ap.add_argument("--small", action="store_true", help="toy sizes for a local smoke test")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    os.makedirs(args.out, exist_ok=True)
    logf = open(os.path.join(args.out, "train.log"), "a")

    def log(*a):
        s = " ".join(str(x) for x in a)
        print(s, flush=True)
        logf.write(s + "\n")
        logf.flush()

    log(f"command: python {' '.join(sys.argv)}")
    log(f"torch {torch.__version__}, device {dev}")
    tok_path = os.path.join(args.data, "tokenizer.json")
    with open(tok_path) as f:
        vocab = len(json.load(f)["model"]["vocab"])
    cfg_json = demo_config(vocab, args.small)
    cfg = Cfg(cfg_json)
    data = {k: np.load(os.path.join(args.data, f"{k}.ids.npy")).astype(np.int64) for k in ("train", "valid", "test", "chat")}
    for k, v in data.items():
        log(f"data {k}: {len(v)} tokens")
    bos = cfg_json["bos_token_id"]
    T = args.seq
    model = Model(cfg, args.seed).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"parameters: {n_params}")

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() == 2 and "hc_" not in name else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    rng = np.random.default_rng(args.seed)
    valid_segs = segments(data["valid"], T, bos)
    test_segs = segments(data["test"], T, bos)

    def batch():
        x = np.empty((args.batch, T), np.int64)
        x[:, 0] = bos
        for b in range(args.batch):
            src = data["chat"] if rng.random() < args.chat_frac else data["train"]
            o = rng.integers(0, len(src) - T)
            x[b, 1:] = src[o: o + T - 1]
        return torch.from_numpy(x).to(dev)

    steps = args.steps
    t0 = time.time()
    step = 0
    best = (float("inf"), None, -1)
    history = []
    probe = 20
    while True:
        total = steps if steps else args.max_steps
        warm = min(100, total // 10 + 1)
        lr = args.lr * (step / warm if step < warm else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm))))
        for g in opt.param_groups:
            g["lr"] = lr
        qat = step >= args.qat_start * total
        x = batch()
        stats = {"load": {}, "indexer_kl": []}
        logits, ml = model(x, qat=qat, stats=stats, drop=args.dropout)
        loss_main = F.cross_entropy(logits[:, :-1].reshape(-1, cfg.V), x[:, 1:].reshape(-1))
        loss_mtp = F.cross_entropy(ml[:, :-1].reshape(-1, cfg.V), x[:, 2:].reshape(-1))
        loss_idx = torch.stack(stats["indexer_kl"]).mean() if stats["indexer_kl"] else torch.zeros((), device=dev)
        loss = loss_main + args.mtp_weight * loss_mtp + args.indexer_weight * loss_idx
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():  # auxiliary-loss-free balancing of the score-routed layers
            for name, cnt in stats["load"].items():
                mod = model.get_submodule(name).ffn.gate
                if not mod.hash:
                    c = cnt.float()
                    mod.bias += args.bias_rate * torch.sign(c.mean() - c)
        step += 1
        if not steps and step == probe:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            per = (time.time() - t0) / probe
            steps = max(probe + 1, min(args.max_steps, int(args.time_budget / per)))
            log(f"measured {per * 1000:.1f} ms/step over {probe} steps: training {steps} steps "
                f"(rerun with --steps {steps} to repeat this schedule)")
        if step % 50 == 0 or step == 1:
            log(f"step {step}/{steps or '?'} lr {lr:.2e} qat {int(qat)} loss {loss_main.item():.4f} mtp {loss_mtp.item():.4f} "
                f"indexer_kl {loss_idx.item():.4f} ({time.time() - t0:.0f}s)")
        if steps and (step % args.eval_every == 0 or step == steps):
            if qat:
                v = evaluate(model, valid_segs[:256], 16, dev)
                history.append({"step": step, "valid_ppl": v["ppl"]})
                log(f"  eval step {step}: valid ppl {v['ppl']:.2f}")
                if v["ppl"] < best[0]:
                    best = (v["ppl"], {k: t.detach().clone() for k, t in model.state_dict().items()}, step)
        if steps and step >= steps:
            break
    train_s = time.time() - t0
    log(f"trained {step} steps in {train_s:.0f}s; best valid ppl {best[0]:.2f} at step {best[2]}")
    model.load_state_dict(best[1])
    res_valid = evaluate(model, valid_segs, 16, dev)
    res_test = evaluate(model, test_segs, 16, dev, full=True)
    log(f"valid ppl {res_valid['ppl']:.3f}; test (held-out) ppl {res_test['ppl']:.3f} over {res_test['tokens']} tokens, "
        f"MTP top-1 agreement {res_test['mtp_top1_agreement']:.4f}")
    ids = data["test"]
    counts = np.bincount(ids, minlength=cfg.V).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    uni = math.exp(-(p * np.log(p)).sum())
    log(f"unigram ppl of the held-out text (its own token frequencies): {uni:.2f}")
    for k, v in res_test["tokens_per_expert"].items():
        log(f"  routing {k}: {v}")
    model_dir = os.path.join(args.out, "model")
    model.cpu()
    n = export(model, cfg_json, tok_path, model_dir)
    log(f"exported {n} tensors to {model_dir} ({os.path.getsize(os.path.join(model_dir, 'model.safetensors'))} bytes)")
    # read the file back (own reader) and check it holds exactly the trained model
    back = Model(cfg, 0)
    back.load_state_dict(read_checkpoint(os.path.join(model_dir, "model.safetensors"))[0], strict=True)
    back.eval()
    model.eval()
    with torch.no_grad():
        x = torch.from_numpy(test_segs[:2].astype(np.int64))
        a, am = model(x, qat=True)
        b, bm = back(x, qat=False)
    fidelity = {"logits_max_abs_diff": float((a - b).abs().max()), "mtp_max_abs_diff": float((am - bm).abs().max()),
                "logits_max_abs": float(a.abs().max())}
    log(f"export read back: trained (QAT forward) vs checkpoint forward: {fidelity}")
    if args.save_state:
        torch.save(model.state_dict(), os.path.join(args.out, "state.pt"))
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump({"command": "python " + " ".join(sys.argv), "steps": step, "train_seconds": train_s,
                   "best_step": best[2], "valid": res_valid, "test": res_test, "unigram_ppl_test": uni,
                   "history": history, "export_fidelity": fidelity, "config": cfg_json}, f, indent=1)


if __name__ == "__main__":
    main()
