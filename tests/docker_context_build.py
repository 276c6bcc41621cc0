"""Checks, without a Docker engine, that the Dockerfile's build stage works:
lays out the build context as `.dockerignore` filters it, runs the
Dockerfile's own `cargo build` line there, and checks that every binary the
image copies was built.

Usage: python tests/docker_context_build.py   (run by tests/run.sh)
"""

import fnmatch
import os
import pathlib
import re
import shutil
import struct
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def ignored(path, patterns):
    parts = path.split("/")
    for pattern in patterns:
        p = pattern.rstrip("/")
        if p.startswith("**/"):
            if any(fnmatch.fnmatch(part, p[3:]) for part in parts):
                return True
        elif fnmatch.fnmatch(path, p) or any(fnmatch.fnmatch("/".join(parts[: i + 1]), p) for i in range(len(parts))):
            return True
    return False


def section_names(path):
    """The section names of a 64-bit little-endian ELF file."""
    data = pathlib.Path(path).read_bytes()
    assert data[:6] == b"\x7fELF\x02\x01", f"{path} is not a 64-bit little-endian ELF file"
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_at = headers[shstrndx][4]
    return {data[names_at + h[0]:data.index(b"\0", names_at + h[0])].decode() for h in headers}


def main():
    patterns = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")]
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    dockerfile = (ROOT / "Dockerfile").read_text()
    # The build stage's RUN instruction, continuation lines joined: every
    # `cargo build` in it runs here, and `cp target/<profile>/<name> /out/`
    # says where each binary the image copies comes from.
    joined = re.sub(r"\\\n\s*", " ", dockerfile)
    run = next((l[4:] for l in joined.splitlines() if l.startswith("RUN ") and "cargo build" in l), None)
    assert run, "no `RUN cargo build` instruction in the Dockerfile"
    commands = [c.strip() for c in run.split("&&") if c.strip().startswith("cargo build")]
    built_at = dict((pathlib.PurePosixPath(t).name, t) for t in re.findall(r"\btarget/(\S+/[^\s/]+)", run))
    copied = re.findall(r"^COPY --from=build /out/(\S+) (\S+)", dockerfile, re.M)
    with tempfile.TemporaryDirectory(prefix="celeriac-docker-context-") as context:
        for f in files:
            if not ignored(f, patterns):
                dest = pathlib.Path(context, f)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / f, dest)
        env = dict(os.environ, CARGO_TARGET_DIR=str(ROOT / "target" / "docker-context"))
        for command in commands:
            print(f"== in the Dockerfile's build context: {command}", flush=True)
            subprocess.run(command, shell=True, cwd=context, env=env, check=True)
    target = ROOT / "target" / "docker-context"
    binaries = [src for src, _ in copied if src != "state"]
    missing = [b for b in binaries if b not in built_at or not (target / built_at[b]).is_file()]
    assert binaries and not missing, f"the image copies binaries the build did not produce: {missing}"
    built = {b: target / built_at[b] for b in binaries}
    unstripped = [b for b in binaries if section_names(built[b]) & {".symtab", ".debug_info"}]
    assert not unstripped, f"the image would ship unstripped binaries: {unstripped}"
    print(f"1 passed, 0 failed: the Dockerfile's build stage produces {', '.join(binaries)}, stripped")


if __name__ == "__main__":
    sys.exit(main())
