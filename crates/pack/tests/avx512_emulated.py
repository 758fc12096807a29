"""The AVX-512 kernels, run on an emulated CPU and checked against their definition.

Most machines this project is built and tested on have no AVX-512, so its kernels cannot run
there natively. bochscpu (PyPI `bochscpu-python`: Bochs's x86 CPU, which implements AVX-512, as a library) runs
them instead, in this process: the case library (`examples/avx512_cases.rs`, a cdylib) is
loaded here, every readable page of the process is mapped into the emulated CPU's page tables
at its own address, and `case_run` is called on the emulated CPU with this thread's stack and
thread-local storage, as if this thread ran it. What it writes lands in the real memory, where
`case_check` (native) holds it to the f64 definition. A negative control runs the first two
cases (int16 and int8 activations) with the AVX-512 register state switched off (XCR0) and
expects #UD, so a pass cannot come from a path without AVX-512 instructions. The emulated CPU
has no VNNI (`vpdpbusd` faults), so the int8 kernel runs its AVX-512 BW loop here; its VNNI
loop is held to the same definition by the native tests on CPUs that have VNNI.

Usage: python3 avx512_emulated.py LIBAVX512_CASES.so
Exit status: 0 pass, 1 fail, 77 bochscpu missing (not installed).
"""

import ctypes
import os
import sys

PAGE = 4096
# The emulated call returns here: nothing is mapped at this address, so the fetch faults and
# the run stops.
SENTINEL = 0x1000
# Guest physical addresses handed out to the mapped pages (each backed by the page itself).
GPA_BASE = 0x1_0000_0000
PML4 = 0x10_0000
UD, PF = 6, 14
# XCR0: x87, SSE, AVX, then AVX-512's opmask, ZMM_Hi256 and Hi16_ZMM state.
XCR0_AVX2, XCR0_AVX512 = 0x7, 0xE7


def load(path):
    # The case library first, global: it provides a glibc 2.38 name the bochscpu wheel needs.
    lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    sys.setdlopenflags(os.RTLD_LAZY | os.RTLD_GLOBAL)
    try:
        import bochscpu  # noqa: F401
        import bochscpu.cpu  # noqa: F401
        import bochscpu.memory  # noqa: F401
    except ImportError as e:
        print(f"bochscpu not available ({e}); install it with: python3 -m pip install bochscpu-python==0.4.0")
        sys.exit(77)
    P, N = ctypes.c_void_p, ctypes.c_size_t
    for name, args, res in [("cases_new", [], P), ("cases_len", [P], N), ("case_run", [P, N], None), ("case_run_address", [], N),
                            ("case_reset", [P, N], None), ("case_check", [P, N, ctypes.c_char_p, N], ctypes.c_int),
                            ("assume_avx512", [], None), ("fs_base", [], N)]:
        f = getattr(lib, name)
        f.argtypes, f.restype = args, res
    return lib


class Emulator:
    """One emulated CPU whose page tables map this process's readable memory as it is now."""

    def __init__(self):
        import bochscpu
        import bochscpu.memory

        self.sess = bochscpu.Session()

        def missing(gpa):
            raise RuntimeError(f"emulated access to unmapped guest physical page {gpa:#x}")

        # Kept on self: the session does not keep the callback alive.
        self.missing = missing
        self.sess.missing_page_handler = missing
        pt = bochscpu.memory.PageMapLevel4Table()
        gpa, pages = GPA_BASE, 0
        with open("/proc/self/maps") as maps:
            for line in maps:
                f = line.split()
                lo, hi = (int(v, 16) for v in f[0].split("-"))
                name = f[5] if len(f) > 5 else ""
                if f[1][0] != "r" or name in ("[vvar]", "[vsyscall]", "[vdso]"):
                    continue
                for va in range(lo, hi, PAGE):
                    # 0: executable, 1: data (read-write).
                    pt.insert(va, gpa, 0 if f[1][2] == "x" else 1)
                    bochscpu.memory.page_insert(gpa, va)
                    gpa, pages = gpa + PAGE, pages + 1
        for hva, table_gpa in pt.commit(PML4):
            bochscpu.memory.page_insert(table_gpa, hva)
        # Kept: the tables' host pages belong to it and are freed with it.
        self.pt = pt
        self.pages = pages

    def call(self, fn, args, stack, fs_base, xcr0):
        """Runs `fn(*args)` (System V: integer arguments) to its return; (exception vector,
        rip) where it stopped: (PF, SENTINEL) is a normal return."""
        import bochscpu
        import bochscpu.cpu

        st = bochscpu.State()
        bochscpu.cpu.set_long_mode(st)
        st.cr0 = (st.cr0 | 0x2) & ~0x4 & ~(1 << 18)  # MP on, EM off (SSE), AM off
        st.cr4 = st.cr4 | (1 << 9) | (1 << 10) | (1 << 18)  # OSFXSR, OSXMMEXCPT, OSXSAVE
        st.xcr0 = xcr0
        st.cr3 = PML4
        def seg(selector, base, attr):
            s = bochscpu.Segment()
            s.present, s.selector, s.base, s.limit, s.attr = True, selector, base, 0xFFFFFFFF, attr
            return s

        st.cs = seg(0x33, 0, 0x22FB)  # 64-bit user code
        st.ss = st.ds = st.es = st.gs = seg(0x2B, 0, 0xCF3)
        st.fs = seg(0, fs_base, 0xCF3)
        top = (ctypes.addressof(stack) + len(stack)) & ~0xF
        rsp = top - 8  # as after a call: the return address on a 16-byte aligned stack
        ctypes.c_uint64.from_address(rsp).value = SENTINEL
        st.rsp, st.rip, st.rflags = rsp, fn, 0x202
        st.mxcsr = 0x1F80  # as a Linux thread starts: every SIMD exception masked, round to nearest
        st.fpcw = 0x37F
        for reg, v in zip(("rdi", "rsi", "rdx", "rcx", "r8", "r9"), args):
            setattr(st, reg, v)
        self.sess.cpu.state = st
        stop = {}

        def exception(sess, cpu, vector, code):
            stop.update(vector=vector, rip=sess.cpu.state.rip)
            sess.stop()

        hook = bochscpu.Hook()
        hook.exception = exception
        self.sess.run([hook])
        return stop.get("vector"), stop.get("rip")


def main():
    lib = load(sys.argv[1])
    cases = lib.cases_new()
    n = lib.cases_len(cases)
    msg = ctypes.create_string_buffer(512)
    failed = 0
    # Natively first (AVX2, or AVX-512 where the host has it): the reference holds, and the allocator and thread-local slots
    # the kernels use are warm, so the emulated calls need no memory the mapping lacks.
    for i in range(n):
        lib.case_reset(cases, i)
        lib.case_run(cases, i)
        if lib.case_check(cases, i, msg, len(msg)):
            print(f"FAIL native: {msg.value.decode()}")
            failed += 1
    lib.assume_avx512()
    stack = ctypes.create_string_buffer(1 << 20)  # before the mapping, which must cover it
    emu = Emulator()
    fs, run = lib.fs_base(), lib.case_run_address()
    print(f"emulator: {emu.pages} pages mapped")
    # Negative control: without AVX-512 state the kernels must fault on their first AVX-512
    # instruction (a pass below is then the AVX-512 code's): cases 0 and 1 are the same
    # matrix on int16 and on int8 activations.
    for i in (0, 1):
        lib.case_reset(cases, i)
        vector, rip = emu.call(run, [cases, i], stack, fs, XCR0_AVX2)
        if vector != UD:
            print(f"FAIL negative control, case {i}: with AVX-512 off the run stopped with vector {vector} at {rip:#x}, expected #UD")
            failed += 1
    for i in range(n):
        lib.case_reset(cases, i)
        vector, rip = emu.call(run, [cases, i], stack, fs, XCR0_AVX512)
        ok = (vector, rip) == (PF, SENTINEL) and not lib.case_check(cases, i, msg, len(msg))
        what = msg.value.decode() if (vector, rip) == (PF, SENTINEL) else f"case {i}: stopped with vector {vector} at {rip:#x} before returning"
        print(("ok   " if ok else "FAIL ") + "emulated AVX-512: " + what)
        failed += not ok
    print(f"{n} cases, {failed} failures")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
