#!/usr/bin/env bash
# Make the base image `ragrec-base:bookworm` without Docker Hub: a minimal Debian bookworm root
# filesystem (python3, python3-venv, ca-certificates) from debootstrap, imported with `docker import`.
# Used by scripts/stack_smoke.sh on machines that cannot pull python:3.11-slim-bookworm; on an
# ordinary machine the Dockerfiles' default base images are pulled instead and this is not needed.
#   bash docker/base_image.sh [TAG] [MIRROR]
set -euo pipefail
TAG=${1:-ragrec-base:bookworm}
MIRROR=${2:-http://deb.debian.org/debian}

for tool in docker debootstrap; do
  command -v "$tool" >/dev/null || { echo "error: $tool is missing: apt-get install -y ${tool/docker/docker.io}" >&2; exit 2; }
done
[ "$(id -u)" = 0 ] || { echo "error: debootstrap needs root" >&2; exit 2; }
if docker image inspect "$TAG" >/dev/null 2>&1; then echo "$TAG exists"; exit 0; fi

root=$(mktemp -d /tmp/ragrec-rootfs.XXXXXX)
chmod 755 "$root"  # it becomes the image's /: mktemp makes it 0700, which locks out non-root users
trap 'rm -rf "$root"' EXIT
start=$(date +%s)
nice -n 19 debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  bookworm "$root" "$MIRROR" >/tmp/ragrec-debootstrap.log 2>&1 \
  || { echo "error: debootstrap failed, see /tmp/ragrec-debootstrap.log" >&2; exit 1; }
# Smaller image: no apt lists, caches, docs or man pages (apt-get update restores the lists).
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
       "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/*
# Same sources as the debootstrap mirror, security updates included.
printf 'deb %s bookworm main\ndeb %s bookworm-updates main\ndeb http://deb.debian.org/debian-security bookworm-security main\n' \
  "$MIRROR" "$MIRROR" > "$root/etc/apt/sources.list"
tar -C "$root" -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["/bin/bash"]' - "$TAG" >/dev/null
echo "$TAG: $(( $(date +%s) - start )) s, $(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1/1e6}')"
