#!/usr/bin/env bash
# CNTK 2.7 for the benchmark: its worker's venv and the Open MPI libraries CNTK links, set up
# once in a folder (a stamp file per part records what was set up; a part whose stamp matches
# is skipped). Needs apt-get and dpkg-deb (Debian or Ubuntu), network access to a Debian
# mirror and to PyPI, and the worker's interpreter.
#
#   impls/cntk_impl/fetch_deps.sh DEST PYTHON PIN...
#
# noxfile.py's _cntk_env runs it with python3.6 and the pins of bench/frameworks.py
# (CNTK_WORKER_PYTHON, CNTK_WORKER_PINS). CNTK 2.7 publishes wheels for CPython <= 3.6 only,
# so it runs in a worker process (impls/cntk_impl) beside the benchmark's own venv; the
# worker's venv is DEST/py36 (PYTHON -m venv, then pip install PIN...).
#
# CNTK links libmpi.so.12 / libmpi_cxx.so.1 (Open MPI 1.x sonames); Debian 12's libopenmpi3
# ships the .so.40 libraries, which serve CNTK (it only starts MPI for distributed training)
# through two symlinks in DEST/lib. The .debs come from the Debian mirror through a private
# apt configuration, state and cache under DEST/apt (the system's apt sources and state are
# neither used nor changed) and are unpacked with dpkg-deb -x into DEST/root, never installed.
# Use it with (noxfile.py's _cntk_env does this)
#   BENCH_CNTK_PYTHON=DEST/py36/bin/python
#   LD_LIBRARY_PATH=DEST/lib:DEST/root/usr/lib/x86_64-linux-gnu
set -euo pipefail

DEST=$(mkdir -p "${1:?usage: fetch_deps.sh DEST PYTHON PIN...}" && cd "$1" && pwd)
PYTHON=${2:?usage: fetch_deps.sh DEST PYTHON PIN...}
shift 2
PINS=("$@")
[ ${#PINS[@]} -gt 0 ] || { echo "usage: fetch_deps.sh DEST PYTHON PIN..." >&2; exit 2; }
# what libmpi.so.40 links that a Debian 12 base lacks (ldd); MPI's plugins never load
DEBS=(libopenmpi3 libhwloc15 libevent-pthreads-2.1-7)
LIBDIR=$DEST/root/usr/lib/x86_64-linux-gnu

# A stamp holds the space-separated list it was made for (no newline), so that a changed
# list sets the part up again; it counts only while the part's product ($3) is still there,
# so a deleted venv or library folder is set up again instead of being trusted.
stamp_is() { [ -f "$1" ] && [ "$(cat "$1")" = "$2" ] && [ -e "$3" ]; }

if ! stamp_is "$DEST/debs.done" "${DEBS[*]}" "$LIBDIR/libmpi.so.40"; then
    A=$DEST/apt
    mkdir -p "$A/state/lists/partial" "$A/cache/archives/partial" "$A/sources.list.d" "$A/debs"
    cat > "$A/sources.list.d/debian.sources" <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    : > "$A/sources.list"
    : > "$A/status"     # apt needs one; `download` resolves no dependencies against it
    APT=(-o Dir::State="$A/state" -o Dir::State::status="$A/status" -o Dir::Cache="$A/cache"
         -o Dir::Etc::sourcelist="$A/sources.list" -o Dir::Etc::sourceparts="$A/sources.list.d"
         -o APT::Sandbox::User=root -o Debug::NoLocking=1)
    apt-get "${APT[@]}" update
    rm -f "$A"/debs/*
    (cd "$A/debs" && apt-get "${APT[@]}" download "${DEBS[@]}")
    for deb in "$A"/debs/*; do
        dpkg-deb -x "$deb" "$DEST/root"
    done
    mkdir -p "$DEST/lib"
    ln -sf "$LIBDIR/libmpi.so.40" "$DEST/lib/libmpi.so.12"
    ln -sf "$LIBDIR/libmpi_cxx.so.40" "$DEST/lib/libmpi_cxx.so.1"
    printf '%s' "${DEBS[*]}" > "$DEST/debs.done"
fi

if ! stamp_is "$DEST/py36.done" "${PINS[*]}" "$DEST/py36/bin/python"; then
    [ -e "$DEST/py36/bin/python" ] || "$PYTHON" -m venv "$DEST/py36"
    "$DEST/py36/bin/python" -m pip install --disable-pip-version-check "${PINS[@]}"
    printf '%s' "${PINS[*]}" > "$DEST/py36.done"
fi
