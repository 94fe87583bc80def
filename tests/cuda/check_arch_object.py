#!/usr/bin/env python3
"""Compiles one kernel translation unit for one SM and checks the object holds code for it.

usage: check_arch_object.py NVCC SOURCE.cu sm_XX[a] INCLUDE_DIR

Uses cuobjdump --list-elf when the toolkit has it; otherwise reads the CUDA ELF images
(e_machine 190 = EM_CUDA) embedded in the object's fatbinary, whose e_flags carry the SM
number in bits 8..15.
"""
import os, re, shutil, struct, subprocess, sys, tempfile

nvcc, src, arch, inc = sys.argv[1:5]
sm = int(re.match(r"sm_(\d+)", arch).group(1))
with tempfile.TemporaryDirectory() as tmp:
    obj = os.path.join(tmp, "k.o")
    subprocess.run([nvcc, "-std=c++20", "-O2", "-I" + inc, "-gencode",
                    f"arch=compute_{arch[3:]},code={arch}", "-c", src, "-o", obj], check=True)
    cuobjdump = shutil.which("cuobjdump") or os.path.join(os.path.dirname(nvcc), "cuobjdump")
    if os.path.exists(cuobjdump):
        out = subprocess.run([cuobjdump, "--list-elf", obj], check=True, capture_output=True, text=True).stdout
        print(out)
        found = [int(m) for m in re.findall(r"\.sm_(\d+)", out)]
    else:
        data = open(obj, "rb").read()
        found, i = [], 1
        while (i := data.find(b"\x7fELF", i)) >= 0:
            if data[i + 4] == 2 and struct.unpack_from("<H", data, i + 18)[0] == 190:
                flags = struct.unpack_from("<I", data, i + 0x30)[0]
                found.append((flags >> 8) & 0xFF)
            i += 4
        print(f"embedded CUDA ELF images for SMs: {found}")
    if sm not in found:
        sys.exit(f"no {arch} code in the object (found {found})")
    print(f"ok: {arch} code present")
