#!/usr/bin/env bash
# Build the infobip-relay image from ../Dockerfile with buildah (no Docker engine or daemon
# needed), then smoke-test it: `infobip-relay --help` and `regions` as the image's own user.
#
#   deploy/build-image.sh [--bootstrap-base] [TAG]          (TAG defaults to localhost/infobip-relay:dev)
#
# Environment:
#   PYTHON_IMAGE       base image of both stages (default python:3.11-slim; must be pullable or local)
#   BUILD_CA_BUNDLE    a CA bundle mounted over the build's /etc/ssl/certs/ca-certificates.crt, for
#                      networks that intercept TLS on the way to PyPI (Debian's pip honours it;
#                      python:3.11-slim's pip uses its bundled certifi instead)
#   BUILDAH_ISOLATION  default chroot, which works inside an unprivileged container too
#
# --bootstrap-base: with no registry to pull python:3.11-slim from, first build
# localhost/bookworm-python:3.11 from Debian's own packages with debootstrap (needs root and a
# Debian mirror) and use it as PYTHON_IMAGE. Its Python is Debian's 3.11 in /usr rather than
# the official image's in /usr/local. The Dockerfile only needs `python` on PATH with venv, so
# the result behaves the same; for releases, still build on python:3.11-slim.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
export BUILDAH_ISOLATION=${BUILDAH_ISOLATION:-chroot}

bootstrap=no
if [[ ${1:-} == --bootstrap-base ]]; then
    bootstrap=yes
    shift
fi
tag=${1:-localhost/infobip-relay:dev}
base=${PYTHON_IMAGE:-python:3.11-slim}

command -v buildah >/dev/null || { echo "buildah not found (apt-get install buildah)" >&2; exit 1; }

if [[ $bootstrap == yes ]]; then
    base=localhost/bookworm-python:3.11
    if ! buildah inspect --type image "$base" >/dev/null 2>&1; then
        command -v debootstrap >/dev/null || { echo "debootstrap not found" >&2; exit 1; }
        rootfs=$(mktemp -d /tmp/bookworm-rootfs.XXXXXX)
        trap 'rm -rf "$rootfs"' EXIT
        # python-is-python3: the Dockerfile calls `python`, as the official image provides it.
        debootstrap --variant=minbase \
            --include=python3,python3-venv,python-is-python3,ca-certificates \
            bookworm "$rootfs" http://deb.debian.org/debian
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
        ctr=$(buildah from scratch)
        mnt=$(buildah mount "$ctr")
        cp -a "$rootfs"/. "$mnt"/
        buildah umount "$ctr"
        buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
            --env LANG=C.UTF-8 --cmd python3 "$ctr"
        buildah commit --quiet "$ctr" "$base"
        buildah rm "$ctr" >/dev/null
        rm -rf "$rootfs"
        trap - EXIT
    fi
fi

mounts=()
if [[ -n ${BUILD_CA_BUNDLE:-} ]]; then
    mounts=(--volume "$BUILD_CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro")
fi

# --format docker keeps HEALTHCHECK, which the OCI image format has no field for.
buildah bud --format docker --layers "${mounts[@]}" \
    --build-arg "PYTHON_IMAGE=$base" --tag "$tag" --file "$root/Dockerfile" "$root"

ctr=$(buildah from "$tag")
trap 'buildah rm "$ctr" >/dev/null' EXIT
# shellcheck disable=SC2016  # expanded by the container's shell, not this one
buildah run "$ctr" -- sh -c 'test "$(id -u)" != 0'
buildah run "$ctr" -- infobip-relay --help >/dev/null
buildah run "$ctr" -- infobip-relay regions
echo "built and smoke-tested $tag (base $base)"
