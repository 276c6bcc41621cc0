"""The PEP 517 backend of the celeriac wheel: maturin, plus the native probe
binaries.

kubelet runs `worker-readiness` and `worker-liveness` every few seconds, so
they must stay small native programs (about 2 MiB and 1 ms each), not
console scripts that start an interpreter. maturin builds only the
extension module, so this backend builds the probes with cargo too and adds
them to the wheel maturin wrote, as its scripts (`celeriac-<ver>.data/scripts`,
which pip installs next to the `celeriac` command). Nothing is written into
the source tree, so two builds of one checkout do not mix their probes.

A portable wheel: maturin's own arguments, from the config setting
`build-args` or `MATURIN_PEP517_ARGS`, e.g.

    pip wheel --no-deps -w dist -C build-args="--zig --compatibility manylinux2014" .
    MATURIN_PEP517_ARGS="--zig --compatibility manylinux2014" pip wheel --no-deps -w dist .

With `--zig`, the probes are linked by zig too (cargo-zigbuild), for the
glibc the `--compatibility` tag names (manylinux2014: 2.17) and the
`--target` (default: this machine's architecture), and the build asks the
front end for `ziglang` and `cargo-zigbuild` from PyPI: no Docker, no
manylinux image. Without `--zig` the wheel is for this machine's glibc
(tag linux_<arch>), as `pip install .` from a checkout has always built.
Either way the build fails if a probe needs a newer glibc than the wheel's
tag promises.
"""

import base64
import hashlib
import os
import pathlib
import platform
import re
import shutil
import subprocess
import sys
import zipfile

import maturin

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROBES = ("worker-readiness", "worker-liveness")
# What `--zig` needs from PyPI: the versions this repository's CI builds with.
ZIG_REQUIRES = ["ziglang>=0.17,<0.18", "cargo-zigbuild>=0.24,<0.25"]
# The glibc each legacy manylinux tag stands for (PEP 600).
LEGACY_MANYLINUX = {"manylinux1": "2.5", "manylinux2010": "2.12", "manylinux2014": "2.17"}


class BuildError(Exception):
    """A wheel this backend refuses to build or to hand back."""


def _option(args, name):
    """The value of `--name VALUE` or `--name=VALUE` in maturin's arguments."""
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _zig_target(args):
    """cargo-zigbuild's target for the probes (`<triple>.<glibc>`), or None for a plain cargo build."""
    if "--zig" not in args:
        return None
    triple = _option(args, "--target") or f"{platform.machine()}-unknown-linux-gnu"
    compat = _option(args, "--compatibility") or _option(args, "--manylinux") or "off"
    if compat in LEGACY_MANYLINUX:
        glibc = LEGACY_MANYLINUX[compat]
    elif m := re.fullmatch(r"(?:manylinux_)?(\d+)_(\d+)", compat):
        glibc = f"{m.group(1)}.{m.group(2)}"
    elif compat in ("off", "linux"):
        return triple  # zig's default glibc; the check below still compares with the tag
    else:
        raise BuildError(f"celeriac_build: --zig with --compatibility {compat} is not supported: "
                         "use manylinux2014 or manylinux_2_<N>")
    return f"{triple}.{glibc}"


def _build_probes(args):
    """Builds the probes (the workspace's `probes` profile: release, stripped,
    panic=abort; see Cargo.toml) and returns their paths."""
    target_dir = pathlib.Path(os.environ.get("CARGO_TARGET_DIR") or ROOT / "target")
    cargo = ["build", "--profile", "probes", "--locked", "-p", "celeriac-probes"]
    zig_target = _zig_target(args)
    if zig_target is None:
        command = ["cargo", *cargo]
        out = target_dir / "probes"
    else:
        zigbuild = shutil.which("cargo-zigbuild")
        if zigbuild is None:
            raise BuildError("celeriac_build: --zig needs cargo-zigbuild (pip install "
                             + " ".join(f"'{r}'" for r in ZIG_REQUIRES) + ")")
        command = [zigbuild, *cargo, "--target", zig_target]
        out = target_dir / zig_target.split(".", 1)[0] / "probes"
    print(f"celeriac_build: {' '.join(command)}", file=sys.stderr, flush=True)
    subprocess.run(command, cwd=ROOT, check=True)
    return [out / name for name in PROBES]


def _glibc_needed(data):
    """The newest GLIBC_x.y symbol version an ELF file names (its version needs), or None."""
    found = {tuple(int(p) for p in v.split(b".")) for v in re.findall(rb"GLIBC_(\d+\.\d+(?:\.\d+)?)\x00", data)}
    return max(found) if found else None


def _tag_glibc(wheel_name):
    """The glibc a wheel's platform tag promises (manylinux_2_17_x86_64: (2, 17)), or None."""
    m = re.search(r"manylinux_(\d+)_(\d+)_", wheel_name)
    if m:
        return int(m.group(1)), int(m.group(2))
    m = re.search(r"(manylinux1|manylinux2010|manylinux2014)_", wheel_name)
    return tuple(int(p) for p in LEGACY_MANYLINUX[m.group(1)].split(".")) if m else None


def _record_line(arcname, data):
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{arcname},sha256={digest},{len(data)}"


def _add_probes(wheel_path, probes):
    """Rewrites maturin's wheel with the probes as its scripts, and the RECORD that lists them."""
    wheel_path = pathlib.Path(wheel_path)
    with zipfile.ZipFile(wheel_path) as src:
        infos = src.infolist()
        record_name = next(i.filename for i in infos if i.filename.endswith(".dist-info/RECORD"))
        data_dir = record_name.split("/", 1)[0].removesuffix(".dist-info") + ".data"
        entries = [(i, src.read(i)) for i in infos if i.filename != record_name]
    tag_glibc = _tag_glibc(wheel_path.name)
    new = []
    for probe in probes:
        data = probe.read_bytes()
        needed = _glibc_needed(data)
        if tag_glibc is not None and needed is not None and needed > tag_glibc:
            raise BuildError(f"celeriac_build: {probe} needs GLIBC_{'.'.join(map(str, needed))}, newer than the "
                             f"{'.'.join(map(str, tag_glibc))} that {wheel_path.name} promises")
        info = zipfile.ZipInfo(f"{data_dir}/scripts/{probe.name}", date_time=(1980, 1, 1, 0, 0, 0))
        info.external_attr = (0o100755 << 16)
        info.compress_type = zipfile.ZIP_DEFLATED
        new.append((info, data))
    names = {info.filename for info, _ in new}
    entries = [(i, d) for i, d in entries if i.filename not in names]
    # Before the .dist-info files, which a wheel keeps last.
    at = next((n for n, (i, _) in enumerate(entries) if ".dist-info/" in i.filename), len(entries))
    entries[at:at] = new
    record = "\n".join([*(_record_line(i.filename, d) for i, d in entries), f"{record_name},,", ""])
    tmp = wheel_path.with_name(wheel_path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for info, data in entries:
            dst.writestr(info, data)
        record_info = zipfile.ZipInfo(record_name, date_time=(1980, 1, 1, 0, 0, 0))
        record_info.external_attr = 0o100644 << 16
        record_info.compress_type = zipfile.ZIP_DEFLATED
        dst.writestr(record_info, record)
    os.replace(tmp, wheel_path)


def _build(hook, wheel_directory, config_settings, metadata_directory):
    args = maturin.get_maturin_pep517_args(config_settings)
    if "--zig" in args:
        # Both maturin and cargo-zigbuild find zig as `<python> -m ziglang`: the interpreter
        # that runs this backend, so the front end's build environment (ZIG_REQUIRES) serves.
        os.environ.setdefault("CARGO_ZIGBUILD_PYTHON_PATH", sys.executable)
    probes = _build_probes(args)
    name = hook(wheel_directory, config_settings, metadata_directory)
    _add_probes(pathlib.Path(wheel_directory) / name, probes)
    return name


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    return _build(maturin.build_wheel, wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    return _build(maturin.build_editable, wheel_directory, config_settings, metadata_directory)


def get_requires_for_build_wheel(config_settings=None):
    extra = ZIG_REQUIRES if "--zig" in maturin.get_maturin_pep517_args(config_settings) else []
    return [*maturin.get_requires_for_build_wheel(config_settings), *extra]


def get_requires_for_build_editable(config_settings=None):
    extra = ZIG_REQUIRES if "--zig" in maturin.get_maturin_pep517_args(config_settings) else []
    return [*maturin.get_requires_for_build_editable(config_settings), *extra]


get_requires_for_build_sdist = maturin.get_requires_for_build_sdist
prepare_metadata_for_build_wheel = maturin.prepare_metadata_for_build_wheel
prepare_metadata_for_build_editable = maturin.prepare_metadata_for_build_editable
build_sdist = maturin.build_sdist
