"""Checks the portable celeriac wheel as pip and auditwheel see it, before
any test installs it:

- its file name and its WHEEL tags: cp310-abi3 (one wheel for CPython 3.10
  and later) on manylinux2014 / manylinux_2_17 for this machine's architecture;
- `auditwheel show`: the wheel is consistent with manylinux_2_17 (no newer
  symbol versions, no library outside the manylinux policy);
- every ELF file in it (the extension module and the two probes), read with
  pyelftools: the newest GLIBC_ symbol version it needs is at most 2.17, it
  links only libraries the manylinux2014 policy allows (never libpython: an
  abi3 extension takes its symbols from the interpreter that loads it), and the
  probes are stripped position-independent executables;
- its scripts are the probes and its console script is `celeriac`.

Usage: <python with auditwheel> tests/wheel_check.py [--arch aarch64] WHEEL
(run by tests/run.sh with target/tools/wheel-venv/bin/python, where it installs
auditwheel; by .github/workflows/release.yml for each architecture's wheel)
"""

import argparse
import io
import json
import platform
import re
import subprocess
import sys
import zipfile

from elftools.elf.elffile import ELFFile
from elftools.elf.gnuversions import GNUVerNeedSection

GLIBC_MAX = (2, 17)
# manylinux2014's library whitelist (PEP 599), which auditwheel enforces too.
ALLOWED = {"libgcc_s.so.1", "libstdc++.so.6", "libm.so.6", "libdl.so.2", "librt.so.1", "libc.so.6", "libnsl.so.1",
           "libutil.so.1", "libpthread.so.0", "libresolv.so.2", "libX11.so.6", "libXext.so.6", "libXrender.so.1",
           "libICE.so.6", "libSM.so.6", "libGL.so.1", "libgobject-2.0.so.0", "libgthread-2.0.so.0",
           "libglib-2.0.so.0", "ld-linux-x86-64.so.2", "ld-linux-aarch64.so.1"}
PROBES = {"worker-readiness", "worker-liveness"}

passed, failed = [], []


def check(ok, what):
    (passed if ok else failed).append(what)
    print(f"{'ok  ' if ok else 'FAIL'} {what}", flush=True)


def elf_facts(data):
    elf = ELFFile(io.BytesIO(data))
    needed, versions = [], set()
    dynamic = elf.get_section_by_name(".dynamic")
    if dynamic is not None:
        needed = [t.needed for t in dynamic.iter_tags() if t.entry.d_tag == "DT_NEEDED"]
    for section in elf.iter_sections():
        if isinstance(section, GNUVerNeedSection):
            for _, auxiliaries in section.iter_versions():
                for aux in auxiliaries:
                    if m := re.fullmatch(r"GLIBC_(\d+)\.(\d+)(?:\.(\d+))?", aux.name):
                        versions.add(tuple(int(p) for p in m.groups() if p is not None))
    return {
        "type": elf.header.e_type,
        "needed": needed,
        "glibc": max(versions) if versions else None,
        "symtab": elf.get_section_by_name(".symtab") is not None,
    }


def main(path, arch):
    name = path.rsplit("/", 1)[-1]
    check(re.fullmatch(rf"celeriac-[^-]+-cp310-abi3-manylinux2014_{arch}\.manylinux_2_17_{arch}\.whl", name) is not None,
          f"file name {name} is cp310-abi3, manylinux2014 / manylinux_2_17, {arch}")
    with zipfile.ZipFile(path) as wheel:
        names = wheel.namelist()
        dist_info = next(n.split("/", 1)[0] for n in names if n.endswith(".dist-info/WHEEL"))
        tags = [l.split(": ", 1)[1] for l in wheel.read(f"{dist_info}/WHEEL").decode().splitlines()
                if l.startswith("Tag: ")]
        check(sorted(tags) == sorted([f"cp310-abi3-manylinux2014_{arch}", f"cp310-abi3-manylinux_2_17_{arch}"]),
              f"WHEEL tags {tags}")
        entry_points = wheel.read(f"{dist_info}/entry_points.txt").decode()
        check(re.search(r"^celeriac\s*=\s*celeriac\._cli:main$", entry_points, re.M) is not None,
              "console script celeriac = celeriac._cli:main")
        data_dir = dist_info.removesuffix(".dist-info") + ".data"
        scripts = {n.rsplit("/", 1)[1] for n in names if n.startswith(f"{data_dir}/scripts/")}
        check(scripts == PROBES, f"scripts {sorted(scripts)} are the two probes")
        elves = {n: wheel.read(n) for n in names if wheel.read(n)[:4] == b"\x7fELF"}
        check(set(elves) == {"celeriac/_native.abi3.so", *(f"{data_dir}/scripts/{p}" for p in PROBES)},
              f"ELF files: {sorted(elves)}")
        for member, data in sorted(elves.items()):
            facts = elf_facts(data)
            glibc = ".".join(map(str, facts["glibc"])) if facts["glibc"] else "none"
            check(facts["glibc"] is None or facts["glibc"] <= GLIBC_MAX,
                  f"{member}: newest GLIBC_ symbol version {glibc} <= 2.17")
            check(set(facts["needed"]) <= ALLOWED, f"{member}: links {facts['needed']}, all in manylinux2014's policy")
            check(not any(n.startswith("libpython") for n in facts["needed"]), f"{member}: no libpython")
            if member.endswith(tuple(PROBES)):
                check(facts["type"] == "ET_DYN" and not facts["symtab"], f"{member}: stripped PIE")
    show = subprocess.run([sys.executable, "-m", "auditwheel", "show", path], capture_output=True, text=True)
    print(show.stdout.strip() or show.stderr.strip(), flush=True)
    shown = subprocess.run([sys.executable, "-m", "auditwheel", "show", "--json", path], capture_output=True, text=True)
    verdict = json.loads(shown.stdout) if shown.returncode == 0 else {}
    check(verdict.get("overall_tag") == f"manylinux_2_17_{arch}" and not verdict.get("external_libs"),
          f"auditwheel show: consistent with {verdict.get('overall_tag') or shown.stderr.strip()}, "
          f"no external libraries to graft ({verdict.get('external_libs')})")
    print(f"{len(passed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default=platform.machine(), help="the wheel's architecture (default: this machine's)")
    parser.add_argument("wheel")
    options = parser.parse_args()
    sys.exit(main(options.wheel, options.arch))
