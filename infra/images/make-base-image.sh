#!/usr/bin/env bash
# Make the local base image localhost/myriad-base:bookworm (Debian bookworm, Python 3.11) from
# Debian's packages, for machines that cannot pull python:3.11-slim from a registry.
# Usage: infra/images/make-base-image.sh [TAG] [ENGINE...]   (ENGINE default: podman)
# Needs mmdebstrap (apt-get install -y mmdebstrap) and root. Does nothing if TAG exists.
set -euo pipefail
tag="${1:-localhost/myriad-base:bookworm}"
shift || true
engine=("$@")
if [ ${#engine[@]} -eq 0 ]; then engine=(podman); fi
if "${engine[@]}" image exists "$tag" 2>/dev/null; then
    exit 0
fi
command -v mmdebstrap >/dev/null || { echo "mmdebstrap is missing: apt-get install -y mmdebstrap" >&2; exit 1; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates \
    --aptopt='Acquire::Languages "none"' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    bookworm "$work/base.tar"
"${engine[@]}" import --quiet --change 'CMD ["python3"]' "$work/base.tar" "$tag" >/dev/null
echo "$tag"
