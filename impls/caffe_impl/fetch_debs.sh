#!/usr/bin/env bash
# Caffe 1.0 for the benchmark: Debian 11 ("bullseye") CPU packages, unpacked into a folder.
# Needs apt-get and dpkg-deb (Debian or Ubuntu), network access to a Debian mirror, ~130 MB.
#
#   impls/caffe_impl/fetch_debs.sh DEST
#
# Debian 12 has no Caffe. This fetches bullseye's python3-caffe and libcaffe1 (the CPU_ONLY
# build), OpenBLAS, and the shared libraries they need that this system lacks (resolved by
# apt against a copy of this system's package list), with a private apt configuration: its
# own sources list, state, lists and cache under DEST/apt. Nothing is installed and the
# system's apt sources are never touched. The .debs are unpacked with dpkg-deb -x into DEST/root;
# use it with (R = DEST/root; noxfile.py's _caffe_env does this)
#   LD_LIBRARY_PATH=$R/usr/lib/x86_64-linux-gnu:$R/usr/lib/x86_64-linux-gnu/openblas-pthread:$R/lib/x86_64-linux-gnu:$R/usr/lib
#   PYTHONPATH=$R/usr/lib/python3/dist-packages
# from a Python 3.9 venv with numpy<1.24 protobuf<3.21 scikit-image<0.20 scipy<1.12 six.
set -euo pipefail

DEST=$(mkdir -p "${1:?usage: fetch_debs.sh DEST}" && cd "$1" && pwd)
MIRROR=${CAFFE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
A="$DEST/apt"
mkdir -p "$A/lists/partial" "$A/cache/archives/partial" "$A/sources.list.d" \
         "$A/preferences.d" "$DEST/debs" "$DEST/root"
echo "deb [signed-by=$KEYRING] $MIRROR bullseye main" > "$A/sources.list"
cp /var/lib/dpkg/status "$A/status"       # a copy: what this system already provides

APT=(-o Dir::Etc::sourcelist="$A/sources.list" -o Dir::Etc::sourceparts="$A/sources.list.d"
     -o Dir::Etc::preferencesparts="$A/preferences.d" -o Dir::State="$A"
     -o Dir::State::lists="$A/lists" -o Dir::State::status="$A/status"
     -o Dir::Cache="$A/cache" -o Dir::Cache::archives="$A/cache/archives"
     -o Debug::NoLocking=1 -o APT::Sandbox::User=root -o APT::Get::List-Cleanup=0
     -o Acquire::Languages=none -o APT::Install-Recommends=0)

apt-get "${APT[@]}" -q update

# The libraries: apt resolves what this system lacks (download only, into the private cache).
# OpenBLAS named first, so it (not the reference BLAS) provides libblas.so.3.
apt-get "${APT[@]}" -q -y install --download-only libopenblas0-pthread libcaffe1
# Not bullseye's libpython3.9 (and its own dependencies): the venv's Python 3.9 has its
# own, already loaded when Caffe is imported, and the one on LD_LIBRARY_PATH would win
# over the interpreter's RUNPATH.
for deb in "$A"/cache/archives/*.deb; do
    case $(basename "$deb") in
        libpython3.9*|libffi7_*|libmpdec3_*) ;;
        *) cp "$deb" "$DEST/debs/" ;;
    esac
done

# The Python package alone: it depends on bullseye's python3 (3.9) and Python modules,
# which come from the venv (pip) instead.
(cd "$DEST/debs" && apt-get "${APT[@]}" -q download python3-caffe)

for deb in "$DEST"/debs/*.deb; do
    dpkg-deb -x "$deb" "$DEST/root"
done
rm -f "$A"/cache/archives/*.deb "$A"/cache/*.bin   # kept once, in DEST/debs
ls "$DEST/debs" > "$DEST/packages.txt"
echo "unpacked $(wc -l < "$DEST/packages.txt") packages into $DEST/root"
