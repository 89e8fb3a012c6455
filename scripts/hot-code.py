#!/usr/bin/env python3
"""Writes proxy/hot-code.ld: the linker script that puts the code the proxy runs ahead of
the code it never runs, so its pages hold only code in use.

A proxy maps its code lazily, in 64 KiB runs around each first touch. Scattered over
10 MB of text, the functions one proxy runs (about a third of it) touched nearly every
run, and all of it counted in the proxy's memory. Grouped, with every instantiation of
the generic functions among them, they fill under half (4.5 of 9.9 MB, release build).

Within the group, what an idle proxy ran (start, certificates, discovery, timers) comes
first: a proxy maps code it ran once for good, and sorted by name the start-up code
touched every 64 KiB run of the group, request code included. By unhashed name, the
instantiations of generic code that the control-plane connection runs (h2, tokio) bring
the data path's along, so the first part is most of the group (3.8 of 4.4 MB); still,
against the same functions sorted by name, an idle release-build pair went from
9.9-10.2 to 9.2-9.8 MiB per proxy (three runs each). Exact names would separate them,
but a function's hash changes with every edit of the crate that instantiates it.

Usage: hot-code.py OUTPUT CALLGRIND_DIR BINARY...
       hot-code.py --check BINARY
  OUTPUT         the linker script to write
  CALLGRIND_DIR  profiles of proxies run with --demangle=no: callgrind.idle.* of idle
                 proxies, callgrind.out.* of proxies under every workload
  BINARY         the builds profiled (release, sidecar: inlining differs with LTO, and
                 so do the functions that exist), for their names and merged functions
  --check        fails unless BINARY, an optimized build, was linked with the script and
                 its patterns still match (they would not after a change of mangling)

Names are matched without their hash (`17h<16 hex>E`) or LLVM's `.llvm.<n>` suffix: a
hash changes with the build profile, the dependency versions and every generic
instantiation, so the script keeps working across builds; the price is that every
instantiation of a generic function that ran is grouped with it. Functions missing from
the script (new code) land after the group, as before: a stale script costs memory,
never correctness. aws-lc's assembly stays where it is: one section per file, with
hundreds of KiB of variants (AVX-512, AVX2, none) of which a proxy runs one.
"""

import pathlib
import re
import subprocess
import sys

HASH = re.compile(r"17h[0-9a-f]{16}E$")
LLVM_SUFFIX = re.compile(r"\.llvm\.\d+$")


def executed(callgrind_dir: pathlib.Path, phase: str) -> set[str]:
    """Every function callgrind saw run (as caller or callee) in the phase's profiles."""
    names = set()
    for path in callgrind_dir.glob(f"callgrind.{phase}.*"):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith(("fn=", "cfn=")):
                names.add(line.split("=", 1)[1])
    return names


def functions_by_address(binary: pathlib.Path) -> dict[str, list[str]]:
    """The binary's function symbols, by address: identical functions are merged into
    one body with several names, and callgrind reports only one of them."""
    output = subprocess.run(
        ["nm", "--defined-only", str(binary)], check=True, capture_output=True, text=True
    ).stdout
    names: dict[str, list[str]] = {}
    for fields in (line.split() for line in output.splitlines()):
        if len(fields) == 3 and fields[1] in "tTwW":
            names.setdefault(fields[0], []).append(fields[2])
    return names


def unhashed(symbol: str) -> str:
    """The name without its hash and LLVM suffix, as a section-name glob."""
    name = LLVM_SUFFIX.sub("", symbol)
    name = HASH.sub("17h", name)
    # `$` (legacy mangling's escapes) does not match in lld's section globs: any one
    # character stands in for it.
    return name.replace("$", "?") + "*"


def section_sizes(binary: pathlib.Path) -> dict[str, int]:
    output = subprocess.run(
        ["readelf", "-SW", str(binary)], check=True, capture_output=True, text=True
    ).stdout
    sizes = {}
    for line in output.splitlines():
        # "  [16] .text.hot  PROGBITS  000000000034f950 34e950 3be587 00  AX  0   0 16"
        fields = line.split("]", 1)[-1].split()
        if len(fields) > 4 and fields[0].startswith(".text"):
            sizes[fields[0]] = int(fields[4], 16)
    return sizes


def check(binary: pathlib.Path) -> int:
    """The grouped code is a sizable share of all code: at the last profile, 4.4 of
    9.9 MB in the release build."""
    sizes = section_sizes(binary)
    hot, total = sizes.get(".text.hot", 0), sum(sizes.values())
    print(f"{binary}: {hot / 1e6:.1f} of {total / 1e6:.1f} MB of code grouped as run")
    if hot < 0.2 * total:
        print("the hot-code script no longer groups the code that runs", file=sys.stderr)
        return 1
    return 0


def grouped(functions: list, executed_names: set[str]) -> list[str]:
    """The section globs of the functions that ran, with every name of a merged body,
    sorted."""
    ran = {unhashed(name) for name in executed_names}
    return sorted(
        {
            unhashed(name)
            for by_address in functions
            for names in by_address
            if any(unhashed(name) in ran for name in names)
            for name in names
        }
    )


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--check":
        return check(pathlib.Path(sys.argv[2]))
    if len(sys.argv) < 4:
        print(__doc__, file=sys.stderr)
        return 2
    output, callgrind_dir, *binaries = map(pathlib.Path, sys.argv[1:])
    functions = [functions_by_address(binary).values() for binary in binaries]
    idle = grouped(functions, executed(callgrind_dir, "idle"))
    busy = sorted(set(grouped(functions, executed(callgrind_dir, "out"))) - set(idle))
    if not idle or not busy:
        print("no executed function of the binary in the profiles", file=sys.stderr)
        return 1
    hot = idle + busy
    # A function marked cold (`OnceLock::initialize`, `RawVec::grow_one`: run at start,
    # or rarely, or never in the training run of a profile-guided build) is in
    # `.text.unlikely.<name>`, one the training run ran often in `.text.hot.<name>`,
    # any other in `.text.<name>`.
    lines = [
        "/* Generated by scripts/hot-code.sh from profiles of idle proxies and of the benchmark",
        "   smoke run: the functions the proxy ran, grouped ahead of the rest of its code, what",
        "   an idle proxy ran first. Do not edit. */",
        "SECTIONS {",
        "  .text.hot : {",
        *(f"    *(.text.{name} .text.hot.{name} .text.unlikely.{name})" for name in hot),
        "  }",
        "} INSERT BEFORE .text;",
        "",
    ]
    output.write_text("\n".join(lines))
    print(f"{output}: {len(hot)} functions that ran, {len(idle)} of them in an idle proxy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
