"""The PEP 517 backend of the celeriac wheel: maturin, after building the
native probe binaries.

kubelet runs `worker-readiness` and `worker-liveness` every few seconds, so
they must stay small native programs (about 2 MiB and 1 ms each), not
console scripts that start an interpreter. maturin builds only the
extension module, so this backend builds the probes with cargo first and
puts them where maturin packs the wheel's scripts (`celeriac.data/scripts`);
pip installs those next to the `celeriac` command.
"""

import os
import pathlib
import shutil
import subprocess

import maturin

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "python" / "celeriac.data" / "scripts"
PROBES = ("worker-readiness", "worker-liveness")

# maturin checks that the data directory exists as soon as it writes the
# wheel's metadata, before any build.
SCRIPTS.mkdir(parents=True, exist_ok=True)


def _build_probes():
    target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    # The workspace's `probes` profile: release, stripped, panic=abort (see
    # Cargo.toml), in a directory of its own.
    subprocess.run(
        ["cargo", "build", "--profile", "probes", "--locked", "-p", "celeriac-probes"],
        cwd=ROOT,
        check=True,
    )
    SCRIPTS.mkdir(parents=True, exist_ok=True)
    for name in PROBES:
        shutil.copy2(target / "probes" / name, SCRIPTS / name)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    _build_probes()
    return maturin.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    _build_probes()
    return maturin.build_editable(wheel_directory, config_settings, metadata_directory)


get_requires_for_build_wheel = maturin.get_requires_for_build_wheel
get_requires_for_build_editable = maturin.get_requires_for_build_editable
get_requires_for_build_sdist = maturin.get_requires_for_build_sdist
prepare_metadata_for_build_wheel = maturin.prepare_metadata_for_build_wheel
prepare_metadata_for_build_editable = maturin.prepare_metadata_for_build_editable
build_sdist = maturin.build_sdist
